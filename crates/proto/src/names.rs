//! Rules for the names users type: topics, subscribers and peers.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name has no bytes.
    #[error("{kind} name is empty")]
    Empty {
        /// What was being named ("topic", "subscriber", "peer").
        kind: &'static str,
    },
    /// The name is longer than 255 bytes.
    #[error("{kind} name is {len} bytes long; the limit is 255")]
    TooLong {
        /// What was being named.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The name holds whitespace or a control character.
    #[error("{kind} name {name:?} contains whitespace or a control character at byte {at}")]
    BadChar {
        /// What was being named.
        kind: &'static str,
        /// The refused name.
        name: String,
        /// Byte index of the first bad character.
        at: usize,
    },
    /// The name has an empty `.`-separated level (leading, trailing or doubled dot).
    #[error("{kind} name {name:?} has an empty level: dots must separate non-empty parts")]
    EmptyLevel {
        /// What was being named.
        kind: &'static str,
        /// The refused name.
        name: String,
    },
}

fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > 255 {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
        });
    }
    if let Some((at, _)) = name
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || c.is_control())
    {
        return Err(NameError::BadChar {
            kind,
            name: name.to_string(),
            at,
        });
    }
    Ok(())
}

/// Checks a topic name: 1–255 bytes of UTF-8, no whitespace or control characters, and
/// `.`-separated levels that are not empty (`news.sports` is fine, `news..sports` is not).
pub fn validate_topic(name: &str) -> Result<(), NameError> {
    validate("topic", name)?;
    if name.split('.').any(str::is_empty) {
        return Err(NameError::EmptyLevel {
            kind: "topic",
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Checks a subscriber name: 1–255 bytes, no whitespace or control characters.
pub fn validate_subscriber(name: &str) -> Result<(), NameError> {
    validate("subscriber", name)
}

/// Checks a peer name: 1–255 bytes, no whitespace or control characters.
pub fn validate_peer_name(name: &str) -> Result<(), NameError> {
    validate("peer", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_levelled_names() {
        for ok in ["news", "news.sports", "a", "ünïcode.тема", &"x".repeat(255)] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_topic_names() {
        assert!(matches!(validate_topic(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            validate_topic(&"x".repeat(256)),
            Err(NameError::TooLong { len: 256, .. })
        ));
        assert!(matches!(
            validate_topic("a b"),
            Err(NameError::BadChar { at: 1, .. })
        ));
        assert!(matches!(
            validate_topic("a\tb"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_topic("a\u{7}"),
            Err(NameError::BadChar { .. })
        ));
        for bad in [".a", "a.", "a..b", "."] {
            assert!(
                matches!(validate_topic(bad), Err(NameError::EmptyLevel { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn subscriber_names_may_hold_dots_anywhere() {
        assert_eq!(validate_subscriber(".x."), Ok(()));
        assert!(validate_subscriber("al ice").is_err());
        let msg = validate_subscriber("").unwrap_err().to_string();
        assert_eq!(msg, "subscriber name is empty");
    }
}
