//! Media types as producers write them: `type "/" subtype *(";" parameter)` (RFC 2046 §1,
//! RFC 9110 §8.3.1, <https://www.rfc-editor.org/rfc/rfc9110#section-8.3.1>). Type and subtype
//! compare case-insensitively; parameters (`charset=utf-8`, what Dapr and the .NET SDK send)
//! do not change what the content is. A `+json` structured-syntax suffix (RFC 6839 §3.1,
//! <https://www.rfc-editor.org/rfc/rfc6839#section-3.1>) says the content is JSON.

/// Why a `datacontenttype` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    /// Not `type/subtype[; parameters]`.
    #[error("{0:?} is not a media type (type/subtype[; parameters])")]
    Malformed(String),
    /// A media type, but not JSON.
    #[error("{0:?} is not JSON (application/json or a +json type)")]
    NotJson(String),
}

/// The `type/subtype` of a media type, lower-cased, parameters dropped.
///
/// Errors: [`MediaTypeError::Malformed`] when either part is missing or not an RFC 9110 token.
pub fn essence(value: &str) -> Result<String, MediaTypeError> {
    let malformed = || MediaTypeError::Malformed(value.to_owned());
    let head = value.split(';').next().unwrap_or_default().trim();
    let (kind, subtype) = head.split_once('/').ok_or_else(malformed)?;
    if !is_token(kind) || !is_token(subtype) {
        return Err(malformed());
    }
    Ok(head.to_ascii_lowercase())
}

/// Whether content of this media type is JSON: `application/json`, or any `+json` suffix
/// (`application/cloudevents+json`, `application/vnd.bookme.booking+json`, …), whatever the
/// case and parameters.
///
/// Errors: [`MediaTypeError`] naming what the value is instead.
pub fn require_json(value: &str) -> Result<(), MediaTypeError> {
    let essence = essence(value)?;
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(MediaTypeError::NotJson(value.to_owned()))
    }
}

/// An RFC 9110 §5.6.2 token: at least one visible ASCII character, none a delimiter.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_whatever_the_case_parameters_or_suffix() {
        for value in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            "  application/json ; charset=\"utf-8\"  ",
            "application/cloudevents+json",
            "application/vnd.bookme.booking+JSON; version=1",
            "text/x-foo+json",
        ] {
            assert_eq!(require_json(value), Ok(()), "{value:?}");
        }
    }

    #[test]
    fn not_json_or_not_a_media_type() {
        for value in [
            "text/plain",
            "application/xml",
            "application/json-seq",
            "application/jsonx",
        ] {
            assert!(
                matches!(require_json(value), Err(MediaTypeError::NotJson(_))),
                "{value:?}"
            );
        }
        for value in [
            "json",
            "",
            "application/",
            "/json",
            "application /json",
            "a/b c",
        ] {
            assert!(
                matches!(require_json(value), Err(MediaTypeError::Malformed(_))),
                "{value:?}"
            );
        }
    }
}
