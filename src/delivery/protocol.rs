//! The WebSocket wire format: parsing client frames and shaping server messages.
//!
//! Pure functions only (no I/O), so the fuzzer can drive the parser directly.

use serde::Deserialize;
use serde_json::{Value, json};

/// A request from a client, after validation of its shape (not of its rights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Start receiving a channel, optionally replaying from an event id.
    Subscribe {
        /// The channel name, e.g. `estadisticas:negocio_1`.
        channel: String,
        /// The id of the last event the client processed.
        since: Option<i64>,
    },
    /// Stop receiving a channel.
    Unsubscribe {
        /// The channel name.
        channel: String,
    },
    /// Liveness check, answered with `pong`.
    Ping,
    /// A fresh token for this connection.
    Auth {
        /// The JWT.
        token: String,
    },
    /// Who is online in a tenant (its `estadisticas:` channel).
    Presence {
        /// The channel name.
        channel: String,
    },
}

/// The `type` of each message the server sends of its own accord (events carry the type
/// they were written with). [`SERVER_MESSAGE_TYPES`] lists them all: an emitted event may
/// not pose as one of them (`citapulse.reserved_event_types()` in `sql/install.sql`
/// holds the same names, checked by `tests/security.rs`).
pub mod types {
    /// After the handshake.
    pub const CONNECTED: &str = "connected";
    /// A subscription accepted.
    pub const SUBSCRIBED: &str = "subscribed";
    /// A subscription ended.
    pub const UNSUBSCRIBED: &str = "unsubscribed";
    /// A tenant's numbers.
    pub const STATS: &str = "stats";
    /// A request refused.
    pub const ERROR: &str = "error";
    /// The answer to `ping`.
    pub const PONG: &str = "pong";
    /// The answer to an accepted `auth` refresh.
    pub const AUTHENTICATED: &str = "authenticated";
    /// Who is online (the answer to `presence`).
    pub const PRESENCE: &str = "presence";
    /// Users who came online.
    pub const PRESENCE_JOIN: &str = "presence_join";
    /// Users who went offline.
    pub const PRESENCE_LEAVE: &str = "presence_leave";
}

/// Every message type the server sends besides events (see [`types`]).
pub const SERVER_MESSAGE_TYPES: [&str; 10] = [
    types::CONNECTED,
    types::SUBSCRIBED,
    types::UNSUBSCRIBED,
    types::STATS,
    types::ERROR,
    types::PONG,
    types::AUTHENTICATED,
    types::PRESENCE,
    types::PRESENCE_JOIN,
    types::PRESENCE_LEAVE,
];

/// Every message type a client sends ([`parse_client_message`]): reserved too, so an
/// event never looks like a request echoed back.
pub const CLIENT_MESSAGE_TYPES: [&str; 5] =
    ["subscribe", "unsubscribe", "presence", "ping", "auth"];

/// Why a client frame was refused; `message` is safe to echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Value,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    since: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelData {
    channel: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthData {
    token: String,
}

fn data_as<T: serde::de::DeserializeOwned>(
    data: Option<Value>,
    what: &str,
) -> Result<T, BadRequest> {
    let data = data.ok_or_else(|| BadRequest(format!("{what} needs a data object")))?;
    serde_json::from_value(data)
        .map_err(|e| BadRequest(format!("bad {what} data: {}", short(&e.to_string()))))
}

fn short(s: &str) -> String {
    s.chars().take(160).collect()
}

/// Parses one text frame.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, BadRequest> {
    let env: Envelope = serde_json::from_str(text).map_err(|e| {
        BadRequest(format!(
            "not a JSON object with a type: {}",
            short(&e.to_string())
        ))
    })?;
    let Value::String(kind) = env.kind else {
        return Err(BadRequest("type must be a string".into()));
    };
    match kind.as_str() {
        "subscribe" => {
            let d: SubscribeData = data_as(env.data, "subscribe")?;
            if d.since.is_some_and(|s| s < 0) {
                return Err(BadRequest("since must be a non-negative event id".into()));
            }
            Ok(ClientMessage::Subscribe {
                channel: d.channel,
                since: d.since,
            })
        }
        "unsubscribe" => {
            let d: ChannelData = data_as(env.data, "unsubscribe")?;
            Ok(ClientMessage::Unsubscribe { channel: d.channel })
        }
        "ping" => Ok(ClientMessage::Ping),
        "presence" => {
            let d: ChannelData = data_as(env.data, "presence")?;
            Ok(ClientMessage::Presence { channel: d.channel })
        }
        "auth" => {
            let d: AuthData = data_as(env.data, "auth")?;
            Ok(ClientMessage::Auth { token: d.token })
        }
        // Truncate after escaping: `{:?}` turns one control character into up to ten.
        other => Err(BadRequest(format!(
            "unknown type {} (expected subscribe, unsubscribe, presence, ping or auth)",
            short(&format!("{other:?}"))
        ))),
    }
}

/// The `code` of an `error` message (docs/protocol.md, "Error codes"); also its `client_errors` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A message the server cannot use (bad JSON, unknown type, bad channel name).
    BadRequest,
    /// Messages faster than `limits.messages_per_sec`.
    RateLimited,
    /// A channel the token does not grant.
    Forbidden,
    /// Over `limits.subscriptions_per_connection`.
    TooManySubscriptions,
    /// A refreshed token that does not verify.
    Unauthorized,
    /// `since` is outside the retained history of the channel.
    HistoryExpired,
    /// The history cannot be read right now.
    Unavailable,
}

impl ErrorCode {
    /// Every code, in the order the docs list them.
    pub const ALL: [ErrorCode; 7] = [
        Self::BadRequest,
        Self::RateLimited,
        Self::Forbidden,
        Self::TooManySubscriptions,
        Self::Unauthorized,
        Self::HistoryExpired,
        Self::Unavailable,
    ];

    /// The code as sent.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::RateLimited => "rate_limited",
            Self::Forbidden => "forbidden",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::Unauthorized => "unauthorized",
            Self::HistoryExpired => "history_expired",
            Self::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"type":"error","data":{"code":…,"message":…}}`.
pub fn error(code: ErrorCode, message: &str) -> String {
    json!({"type": types::ERROR, "data": {"code": code.as_str(), "message": message}}).to_string()
}

/// `{"type":"error",…}` for one channel.
pub fn channel_error(code: ErrorCode, message: &str, channel: &str) -> String {
    json!({"type": types::ERROR, "data": {"code": code.as_str(), "message": message, "channel": channel}})
        .to_string()
}

/// `{"type":"subscribed","channel":…}`.
pub fn subscribed(channel: &str) -> String {
    json!({"type": types::SUBSCRIBED, "channel": channel}).to_string()
}

/// `{"type":"unsubscribed","channel":…}`.
pub fn unsubscribed(channel: &str) -> String {
    json!({"type": types::UNSUBSCRIBED, "channel": channel}).to_string()
}

/// `{"type":"presence","channel":…,"data":{"users":[…]}}`.
pub fn presence(channel: &str, users: Vec<Value>) -> String {
    json!({"type": types::PRESENCE, "channel": channel, "data": {"users": users}}).to_string()
}

/// `{"type":"pong","data":{"timestamp":…}}` (Unix milliseconds).
pub fn pong(timestamp_ms: u128) -> String {
    json!({"type": types::PONG, "data": {"timestamp": timestamp_ms as u64}}).to_string()
}

/// `{"type":"connected","data":{…}}`.
pub fn connected(user_id: &str, tenant: Option<&str>, role: Option<&str>) -> String {
    json!({"type": types::CONNECTED, "data": {"user_id": user_id, "tenant": tenant, "role": role}})
        .to_string()
}

/// `{"type":"authenticated",…}` after a token refresh.
pub fn reauthenticated(expires_at: u64) -> String {
    json!({"type": types::AUTHENTICATED, "data": {"expires_at": expires_at}}).to_string()
}

/// One event message; `data` is JSON text from the log, spliced in unparsed.
pub fn event(event_type: &str, channel: &str, id: i64, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + channel.len() + event_type.len() + 48);
    out.push_str("{\"type\":");
    push_json_str(&mut out, event_type);
    out.push_str(",\"channel\":");
    push_json_str(&mut out, channel);
    out.push_str(",\"id\":");
    out.push_str(&id.to_string());
    out.push_str(",\"data\":");
    out.push_str(if data.is_empty() { "{}" } else { data });
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str to JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_sent_as_documented() {
        let codes: Vec<&str> = [
            ErrorCode::BadRequest,
            ErrorCode::RateLimited,
            ErrorCode::Forbidden,
            ErrorCode::TooManySubscriptions,
            ErrorCode::Unauthorized,
            ErrorCode::HistoryExpired,
            ErrorCode::Unavailable,
        ]
        .into_iter()
        .map(ErrorCode::as_str)
        .collect();
        assert_eq!(
            codes,
            [
                "bad_request",
                "rate_limited",
                "forbidden",
                "too_many_subscriptions",
                "unauthorized",
                "history_expired",
                "unavailable",
            ]
        );
        let docs = include_str!("../../docs/protocol.md");
        for code in codes {
            assert!(
                docs.contains(&format!("`{code}`")),
                "docs/protocol.md documents {code}"
            );
        }
        let msg: serde_json::Value =
            serde_json::from_str(&channel_error(ErrorCode::HistoryExpired, "m", "c")).unwrap();
        assert_eq!(msg["data"]["code"], "history_expired");
        assert_eq!(msg["data"]["channel"], "c");
    }

    #[test]
    fn parses_every_client_message() {
        assert_eq!(
            parse_client_message(
                r#"{"type":"subscribe","data":{"channel":"estadisticas:a","since":7}}"#
            ),
            Ok(ClientMessage::Subscribe {
                channel: "estadisticas:a".into(),
                since: Some(7)
            })
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"unsubscribe","data":{"channel":"x"}}"#),
            Ok(ClientMessage::Unsubscribe {
                channel: "x".into()
            })
        );
        assert_eq!(
            parse_client_message(r#"{"type":"auth","data":{"token":"t"}}"#),
            Ok(ClientMessage::Auth { token: "t".into() })
        );
    }

    #[test]
    fn refuses_malformed_frames() {
        for bad in [
            "",
            "nope",
            "[]",
            "{}",
            r#"{"type":1}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","data":{"channel":5}}"#,
            r#"{"type":"subscribe","data":{"channel":"a","since":-1}}"#,
            r#"{"type":"subscribe","data":{"channel":"a","since":"x"}}"#,
            r#"{"type":"dance"}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrong_field_types_and_extra_fields_are_refused() {
        for bad in [
            r#"{"type":"auth","data":{"token":7}}"#,
            r#"{"type":"auth","data":"t"}"#,
            r#"{"type":"unsubscribe","data":{}}"#,
            r#"{"type":"subscribe","data":{"channel":"a","since":1.5}}"#,
            r#"{"type":"subscribe","data":{"channel":"a","extra":true}}"#,
            r#"{"type":"subscribe","data":[]}"#,
            r#"{"type":null}"#,
            r#"{"type":["ping"]}"#,
            r#"{"data":{}}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
        // Deep nesting costs no stack: skipped when ignored, refused by serde_json's
        // recursion limit where it is parsed.
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        let ignored = format!(r#"{{"type":"ping","x":{open}{close}}}"#);
        assert_eq!(parse_client_message(&ignored), Ok(ClientMessage::Ping));
        let parsed = format!(r#"{{"type":"subscribe","data":{open}{close}}}"#);
        assert!(parse_client_message(&parsed).is_err());
    }

    #[test]
    fn echoed_types_stay_short_after_escaping() {
        // Found by the fuzzer: 160 DEL characters became 1 280 once escaped.
        let text = format!(r#"{{"type":"{}"}}"#, r"\u007f".repeat(1000));
        let Err(BadRequest(why)) = parse_client_message(&text) else {
            panic!("unknown type accepted");
        };
        assert!(why.chars().count() <= 400, "{} chars", why.chars().count());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary text gets a message or a short reason, never a panic.
            #[test]
            fn any_text_gets_a_bounded_answer(text in any::<String>()) {
                if let Err(BadRequest(why)) = parse_client_message(&text) {
                    prop_assert!(why.chars().count() <= 400);
                }
            }

            /// Arbitrary JSON shapes around the known types: never a negative `since`.
            #[test]
            fn json_shapes_parse_consistently(
                kind in prop_oneof![
                    Just("subscribe".to_string()),
                    Just("unsubscribe".to_string()),
                    Just("ping".to_string()),
                    Just("auth".to_string()),
                    Just("presence".to_string()),
                    any::<String>(),
                ],
                channel in any::<String>(),
                since in any::<Option<i64>>(),
            ) {
                let mut data = json!({"channel": channel});
                if let Some(s) = since {
                    data["since"] = json!(s);
                }
                let text = json!({"type": kind, "data": data}).to_string();
                match parse_client_message(&text) {
                    Ok(ClientMessage::Subscribe { channel: c, since: s }) => {
                        prop_assert_eq!(kind.as_str(), "subscribe");
                        prop_assert_eq!(c, channel);
                        prop_assert_eq!(s, since);
                        prop_assert!(s.is_none_or(|s| s >= 0));
                    }
                    Ok(ClientMessage::Unsubscribe { .. }) => {
                        prop_assert_eq!(kind.as_str(), "unsubscribe");
                        prop_assert!(since.is_none(), "unknown field accepted");
                    }
                    Ok(ClientMessage::Presence { channel: c }) => {
                        prop_assert_eq!(kind.as_str(), "presence");
                        prop_assert_eq!(c, channel);
                        prop_assert!(since.is_none(), "unknown field accepted");
                    }
                    Ok(ClientMessage::Ping) => prop_assert_eq!(kind.as_str(), "ping"),
                    Ok(ClientMessage::Auth { .. }) => prop_assert!(false, "auth without token"),
                    Err(_) => prop_assert!(
                        !matches!(kind.as_str(), "subscribe" | "ping")
                            || since.is_some_and(|s| s < 0)
                    ),
                }
            }

            /// Event messages are valid JSON whatever the type and channel text.
            #[test]
            fn event_messages_are_valid_json(kind in any::<String>(), channel in any::<String>(), id in any::<i64>()) {
                let text = event(&kind, &channel, id, r#"{"a":1}"#);
                let v: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(v["type"].as_str(), Some(kind.as_str()));
                prop_assert_eq!(v["channel"].as_str(), Some(channel.as_str()));
                prop_assert_eq!(v["id"].as_i64(), Some(id));
            }
        }
    }

    #[test]
    fn every_server_message_has_a_listed_type() {
        let sent = [
            error(ErrorCode::BadRequest, "m"),
            channel_error(ErrorCode::Forbidden, "m", "c"),
            subscribed("c"),
            unsubscribed("c"),
            presence("c", Vec::new()),
            pong(1),
            connected("u", None, None),
            reauthenticated(1),
        ];
        for text in sent {
            let v: Value = serde_json::from_str(&text).unwrap();
            let kind = v["type"].as_str().unwrap_or_default();
            assert!(SERVER_MESSAGE_TYPES.contains(&kind), "{kind} is not listed");
        }
        for kind in CLIENT_MESSAGE_TYPES {
            let text = json!({"type": kind, "data": {"channel": "c", "token": "t"}}).to_string();
            let parsed = parse_client_message(&text);
            assert!(
                !matches!(&parsed, Err(BadRequest(why)) if why.starts_with("unknown type")),
                "{kind}: {parsed:?}"
            );
        }
    }

    #[test]
    fn event_json_is_valid() {
        let text = event("cita_\"x", "estadisticas:a", 5, r#"{"row":{"id":1}}"#);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], 5);
        assert_eq!(v["type"], "cita_\"x");
        assert_eq!(v["data"]["row"]["id"], 1);
    }

    /// The machine-readable schema of the protocol names what the code sends and takes.
    #[test]
    fn the_json_schema_names_every_type_and_code_the_code_has() {
        let schema: Value = serde_json::from_str(include_str!("../../docs/protocol.schema.json"))
            .unwrap_or_default();
        let names = |def: &str| -> Vec<String> {
            schema["$defs"][def]["enum"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.to_string().trim_matches('"').to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(names("ClientMessageType"), CLIENT_MESSAGE_TYPES);
        assert_eq!(names("ServerMessageType"), SERVER_MESSAGE_TYPES);
        assert_eq!(
            names("ErrorCode"),
            ErrorCode::ALL.map(ErrorCode::as_str).to_vec()
        );
        assert_eq!(
            names("CloseCode"),
            crate::delivery::close::CloseCode::ALL
                .iter()
                .map(|c| c.code().to_string())
                .collect::<Vec<_>>()
        );
    }
}
