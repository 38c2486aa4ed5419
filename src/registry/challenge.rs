//! `WWW-Authenticate` challenges: what a registry wants before it answers.

/// A parsed `WWW-Authenticate` challenge we know how to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Picks the first Bearer or Basic challenge from a header value.
    pub fn parse(header: &str) -> Option<Self> {
        for challenge in http_auth::parser::ChallengeParser::new(header) {
            let Ok(challenge) = challenge else { break };
            let param = |name: &str| {
                challenge
                    .params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            if challenge.scheme.eq_ignore_ascii_case("bearer") {
                // A Bearer challenge without a realm cannot be answered.
                let realm = param("realm").filter(|r| !r.trim().is_empty())?;
                return Some(Self::Bearer {
                    realm,
                    service: param("service"),
                    scope: param("scope"),
                });
            }
            if challenge.scheme.eq_ignore_ascii_case("basic") {
                return Some(Self::Basic);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=\"x\""), None);
        assert_eq!(Challenge::parse("Bearer realm=\"\",service=\"x\""), None);
        assert_eq!(Challenge::parse("garbage ,,, \""), None);
        assert_eq!(Challenge::parse(""), None);
    }
}
