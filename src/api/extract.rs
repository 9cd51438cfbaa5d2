//! Request bodies: size limit, content type, JSON with errors that name the
//! field and never echo the client's values.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, Method, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::error::{mask_digits, ApiError};
use super::AppState;

/// How much of an over-limit body is read and thrown away before answering
/// 413, so well-behaved clients get the answer instead of a reset.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads the whole body, answering 413 past `limit`.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            ApiError::invalid("body_read_error", "the request body could not be read")
        })?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > limit {
                if seen > DRAIN_LIMIT {
                    break;
                }
                continue;
            }
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body must be at most {limit} bytes"),
        ));
    }
    Ok(buf.freeze())
}

/// Parses JSON into `T`, mapping serde's errors to client-safe messages.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut *de);
    let value = result.map_err(|err| {
        let path = mask_digits(&err.path().to_string());
        let inner = err.into_inner();
        json_error(&path, &inner)
    })?;
    // Anything after the document (a second document, stray text) is an
    // error, not something to ignore.
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, err: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::invalid(
            "invalid_json",
            format!(
                "request body is not valid JSON (line {}, column {})",
                err.line(),
                err.column()
            ),
        ),
        Category::Data => {
            let msg = err.to_string();
            let base = if path == "." { "" } else { path };
            let join = |field: &str| {
                if base.is_empty() {
                    field.to_string()
                } else {
                    format!("{base}.{field}")
                }
            };
            if let Some(field) = between(&msg, "missing field `", "`") {
                let param = join(field);
                ApiError::invalid("parameter_missing", format!("{param} is required"))
                    .with_param(param)
            } else if let Some(field) = between(&msg, "unknown field `", "`") {
                // The path already ends with the unknown key.
                let param = if base.is_empty() {
                    mask_digits(field)
                } else {
                    base.to_string()
                };
                ApiError::invalid("parameter_unknown", format!("unknown field {param}"))
                    .with_param(param)
            } else if let Some(expected) = expected(&msg) {
                let param = if base.is_empty() {
                    "body".to_string()
                } else {
                    base.to_string()
                };
                ApiError::invalid("invalid_type", format!("{param} must be {expected}"))
                    .with_param(param)
            } else {
                let param = if base.is_empty() {
                    "body".to_string()
                } else {
                    base.to_string()
                };
                ApiError::invalid("invalid_value", format!("{param} has an invalid value"))
                    .with_param(param)
            }
        }
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// The "expected …" part of a serde message: it comes from the target type,
/// never from the input.
fn expected(msg: &str) -> Option<String> {
    let from = msg.find(", expected ")? + ", expected ".len();
    let rest = &msg[from..];
    let end = rest.find(" at line").unwrap_or(rest.len());
    let text = &rest[..end];
    let text = match text {
        "i64" | "u32" | "u64" | "i32" | "u8" | "u16" => "an integer",
        "a boolean" | "a string" | "a map" | "a sequence" => text,
        other => other,
    };
    Some(mask_digits(text))
}

/// JSON body extractor: `application/json`, size-limited, strict.
pub struct JsonBody<T>(pub T);

fn check_content_type(req: &Request) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_content_type",
            "request body must be JSON with Content-Type: application/json",
        )
        .with_param("Content-Type"))
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        check_content_type(&req)?;
        let bytes = read_body(req.into_body(), state.limits.max_body_bytes).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// For POSTs without parameters: accepts an empty body or `{}`.
pub struct EmptyBody;

impl FromRequest<AppState> for EmptyBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let has_type = req.headers().contains_key(header::CONTENT_TYPE);
        let is_post = req.method() == Method::POST;
        if has_type {
            check_content_type(&req)?;
        }
        let bytes = read_body(req.into_body(), state.limits.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(EmptyBody);
        }
        if is_post && !has_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_content_type",
                "request body must be JSON with Content-Type: application/json",
            )
            .with_param("Content-Type"));
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Nothing {}
        parse_json::<Nothing>(&bytes).map(|_| EmptyBody)
    }
}

/// Deserializes a field that may be absent (`None`), `null` (`Some(None)`)
/// or a value (`Some(Some(v))`), for PATCH semantics.
pub fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(de).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Card {
        number: String,
        exp_month: i64,
    }

    #[test]
    fn errors_name_the_field_and_never_echo_values() {
        let e = parse_json::<Card>(br#"{"number": 4111111111111111, "exp_month": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("number"));
        assert!(!e.message.contains("4111"), "{}", e.message);
        let e = parse_json::<Card>(br#"{"number": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("exp_month"));
        assert_eq!(e.code, "parameter_missing");
        let e = parse_json::<Card>(br#"{"number": "x", "exp_month": 1, "4111111111111111": 1}"#)
            .unwrap_err();
        assert_eq!(e.code, "parameter_unknown");
        assert!(!e.message.contains("4111111111111111"));
        let e = parse_json::<Card>(br#"{"number": "#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_json::<Card>(br#"{"number": "x", "exp_month": "12"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("exp_month"));
        assert_eq!(e.message, "exp_month must be an integer");
    }

    #[test]
    fn digit_runs_are_masked() {
        assert_eq!(mask_digits("a4111111111111111b"), "a[redacted]b");
        assert_eq!(mask_digits("card 4242"), "card 4242");
    }
}
