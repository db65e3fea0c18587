//! Text the guest wrote (its console, the agent's error messages, the names it reports),
//! made fit for the host's logs and for the errors containerd passes on to `ctr` and the
//! kubelet: bounded in length, and with control characters escaped so that it can neither
//! forge a line of a log nor send escape sequences to the terminal of whoever reads an error.

/// The most of one message from the guest that reaches a log line or an error.
pub const MESSAGE_MAX: usize = 1024;

/// `text` with every control character but newline and tab escaped (`\u{1b}`), cut to at
/// most `max` bytes at a character boundary, saying how much was cut.
pub fn bounded(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (i, c) in text.char_indices() {
        let piece: String = if c.is_control() && c != '\n' && c != '\t' {
            c.escape_unicode().collect()
        } else {
            c.into()
        };
        if out.len() + piece.len() > max {
            out.push_str(&format!(
                " … ({} more bytes from the guest cut)",
                text.len() - i
            ));
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// [`bounded`] to [`MESSAGE_MAX`], with newlines escaped too: one message, one line.
pub fn message(text: &str) -> String {
    bounded(&text.replace('\n', "\\n"), MESSAGE_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_left_as_it_is() {
        assert_eq!(
            message("no such process: pid 12"),
            "no such process: pid 12"
        );
        assert_eq!(bounded("a\n\tb", 100), "a\n\tb");
    }

    #[test]
    fn control_characters_are_escaped_and_a_message_is_one_line() {
        let forged = "x\n\u{1b}]0;owned\u{7}time=\"…\" level=error msg=\"forged\"\r";
        let m = message(forged);
        assert!(
            !m.contains('\n') && !m.contains('\u{1b}') && !m.contains('\r'),
            "{m:?}"
        );
        assert!(m.starts_with("x\\n\\u{1b}]0;owned\\u{7}"), "{m:?}");
    }

    #[test]
    fn a_flood_is_cut_at_a_character_boundary_saying_how_much() {
        let flood = "é".repeat(3 << 20);
        let m = message(&flood);
        assert!(m.len() <= MESSAGE_MAX + 64, "{} bytes", m.len());
        assert!(m.ends_with(&format!(
            "({} more bytes from the guest cut)",
            flood.len() - 1024
        )));
    }
}
