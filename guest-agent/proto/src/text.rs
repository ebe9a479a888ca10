//! Text that came from a guest, made safe to show on an operator's terminal: every control
//! character (and the bidirectional-text overrides that can disguise a line) is shown as
//! `\xNN` for each of its UTF-8 bytes, so a hostile guest cannot move the cursor, clear the
//! screen, or make one path look like another.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every hidden character as `\xNN` escapes (borrowed when nothing needs one).
pub fn shown(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes from a guest as text: valid UTF-8 as `shown`, anything else as `\xNN`; a newline or a
/// tab is kept when `keep_lines` (command output read line by line).
pub fn shown_bytes(bytes: &[u8], keep_lines: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if keep_lines && (c == '\n' || c == '\t') {
                out.push(c);
            } else {
                out.push_str(&shown(c.encode_utf8(&mut [0u8; 4])));
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_plain_text_is_not() {
        assert!(matches!(shown("/opt/app/version"), Cow::Borrowed(_)));
        assert_eq!(shown("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(shown("evil\u{202e}txt.exe"), "evil\\xe2\\x80\\xaetxt.exe");
        assert_eq!(shown("line\nnext\r"), "line\\x0anext\\x0d");
        assert_eq!(shown("caf\u{e9}"), "caf\u{e9}");
        assert_eq!(shown_bytes(b"ok\n\xff\x07", true), "ok\n\\xff\\x07");
        assert_eq!(shown_bytes(b"ok\n", false), "ok\\x0a");
    }
}
