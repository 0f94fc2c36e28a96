//! Text cleaning exactly as the official `dataset/utils.py` (`pre_caption`, `pre_question`).

use super::DataError;

/// The characters the official regex `[,.'!?"()*#:;~]` deletes.
const DELETED: &[char] = &[
    ',', '.', '\'', '!', '?', '"', '(', ')', '*', '#', ':', ';', '~',
];

/// Python's `str.isspace` (what `\s` matches in a `str` regex): Unicode White_Space plus the
/// information separators U+001C..U+001F, which Python counts as whitespace and Rust does not.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Lower-case, delete the punctuation set, map '-' and '/' to ' ' (shared first step of both cleaners).
fn clean_common(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|c| !DELETED.contains(c))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect()
}

/// Keep the first `max_words` words of `text.split(' ')` (Python semantics: empty words count).
fn truncate_words(text: String, max_words: usize) -> String {
    let words: Vec<&str> = text.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        text
    }
}

/// `re.sub(r"\s{2,}", ' ', s)` with Python's notion of whitespace.
fn collapse_whitespace_runs(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if py_isspace(chars[i]) {
            let mut j = i;
            while j < chars.len() && py_isspace(chars[j]) {
                j += 1;
            }
            if j - i >= 2 {
                out.push(' ');
            } else {
                out.push(chars[i]);
            }
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The official `pre_caption(caption, max_words)`; an empty result is an error (the sample is skipped).
pub fn pre_caption(caption: &str, max_words: usize) -> Result<String, DataError> {
    let cleaned = clean_common(caption).replace("<person>", "person");
    let collapsed = collapse_whitespace_runs(&cleaned);
    let trimmed = collapsed
        .trim_end_matches('\n')
        .trim_matches(' ')
        .to_string();
    let out = truncate_words(trimmed, max_words);
    if out.is_empty() {
        return Err(DataError::Sample(format!(
            "pre_caption yields invalid text from {caption:?}"
        )));
    }
    Ok(out)
}

/// The official `pre_question(question, max_ques_words)` (VQA): no whitespace collapsing, may be empty.
pub fn pre_question(question: &str, max_ques_words: usize) -> String {
    let cleaned = clean_common(question);
    truncate_words(cleaned.trim_end_matches(' ').to_string(), max_ques_words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_runs_follow_python() {
        assert_eq!(collapse_whitespace_runs("a\tb\n\nc   d"), "a\tb c d");
        assert_eq!(collapse_whitespace_runs("a\u{1c}\u{1d}b"), "a b");
    }

    #[test]
    fn empty_caption_is_error() {
        assert!(pre_caption("?!.,;:", 30).is_err());
        assert!(pre_caption("", 30).is_err());
        assert_eq!(pre_caption("A-b", 1).unwrap(), "a");
    }
}
