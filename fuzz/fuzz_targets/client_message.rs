//! Any text a client can send must parse into a message or a bounded `bad_request`,
//! never a panic, and accepted messages must respect the parser's own rules.
#![no_main]

use citapulse::delivery::protocol::{BadRequest, ClientMessage, parse_client_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The socket hands the parser UTF-8 only (tungstenite rejects the rest).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_message(text) {
        Ok(ClientMessage::Subscribe { since, .. }) => {
            assert!(since.is_none_or(|s| s >= 0), "negative since accepted");
        }
        Ok(_) => {}
        Err(BadRequest(why)) => {
            // The reason is echoed to the client: it must stay short whatever the input.
            assert!(why.chars().count() <= 400, "unbounded error text");
        }
    }
});
