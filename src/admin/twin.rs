//! The console's "Script this" commands: the CLI and curl twins of a page. Every value in them
//! that came from an event, a tenant file, an org or the page's URL is quoted as one shell
//! word, so that a copied command runs with it as an argument, never as shell syntax. A
//! CloudEvents `id` may be any non-empty string
//! (<https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md#id>): an event id of
//! `x; rm -rf ~` would otherwise end the command it was pasted into and start another.

/// `value` as one POSIX shell word: unchanged when it needs no quoting, else single-quoted
/// (`shlex`). A NUL byte, which no shell argument can hold, gives the placeholder `VALUE`, for
/// the person to fill in.
pub fn shell_word(value: &str) -> String {
    shlex::try_quote(value).map_or_else(|_| "VALUE".to_owned(), |word| word.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_one_word_of_itself() {
        for value in [
            "evt_01JD6Q7M1V3S6",
            "x; rm -rf ~",
            "it's",
            "$(id)",
            "`id`",
            "a b\nc",
            "\"quoted\"",
            "",
            "é,ü",
        ] {
            let word = shell_word(value);
            // A real shell reads it back as one argument, itself.
            let printed = std::process::Command::new("sh")
                .args(["-c", &format!("printf '%s|' {word}")])
                .output()
                .expect("sh runs");
            assert_eq!(
                String::from_utf8_lossy(&printed.stdout),
                format!("{value}|"),
                "{value:?} as {word}"
            );
        }
        assert_eq!(shell_word("evt_01JD6Q7M1V3S6"), "evt_01JD6Q7M1V3S6");
        assert_eq!(shell_word("nul\0byte"), "VALUE");
    }
}
