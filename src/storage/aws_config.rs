//! The shared AWS configuration files (`~/.aws/credentials`, `~/.aws/config`) read into
//! object_store settings for the S3 client. Invariant: the environment wins over the files
//! (the caller only applies a setting the environment left unset).

use std::path::PathBuf;

/// Settings from the shared AWS files (`~/.aws/credentials`, `~/.aws/config`, or the files
/// named by `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), for the profile named by
/// `AWS_PROFILE` (default `default`): keys, session token, region and endpoint URL.
pub fn aws_config_files() -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| -> Option<String> {
        let path = std::env::var_os(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)))?;
        std::fs::read_to_string(path).ok()
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut out = Vec::new();
    if let Some(text) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") {
        out.extend(aws_profile_settings(&text, &profile, false));
    }
    if let Some(text) = file("AWS_CONFIG_FILE", ".aws/config") {
        out.extend(aws_profile_settings(&text, &profile, true));
    }
    out
}

/// The settings of one profile of an AWS shared config/credentials file (INI). In the config
/// file, profiles other than `default` are written `[profile NAME]`.
fn aws_profile_settings(
    text: &str,
    profile: &str,
    config_file: bool,
) -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let wanted = if config_file && profile != "default" { format!("profile {profile}") } else { profile.to_string() };
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section != wanted {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => K::AccessKeyId,
            "aws_secret_access_key" => K::SecretAccessKey,
            "aws_session_token" => K::Token,
            "region" => K::Region,
            "endpoint_url" => K::Endpoint,
            _ => continue,
        };
        out.push((key, v.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_profiles() {
        use object_store::aws::AmazonS3ConfigKey as K;
        let creds = "[default]\naws_access_key_id = A\naws_secret_access_key=S\n\n[other]\naws_access_key_id = B\n";
        let config = "[default]\nregion = eu-west-1\n[profile other]\nregion = us-west-2\nendpoint_url = http://127.0.0.1:9000\n";
        assert_eq!(
            aws_profile_settings(creds, "default", false),
            vec![(K::AccessKeyId, "A".to_string()), (K::SecretAccessKey, "S".to_string())]
        );
        assert_eq!(aws_profile_settings(creds, "other", false), vec![(K::AccessKeyId, "B".to_string())]);
        assert_eq!(
            aws_profile_settings(config, "other", true),
            vec![(K::Region, "us-west-2".to_string()), (K::Endpoint, "http://127.0.0.1:9000".to_string())]
        );
        assert_eq!(aws_profile_settings(config, "default", true), vec![(K::Region, "eu-west-1".to_string())]);
    }
}
