//! The one error type of the selector module: where parsing stopped, what was wanted and what
//! was there, rendered with the input and a caret.

use std::fmt;

/// A selector that does not parse.
///
/// `Display` shows the input with a caret under the failing position:
/// ```text
/// selector "role == 'db' &&": expected a label expression at column 16, found end of input
///   role == 'db' &&
///                  ^
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SelectorError {
    /// The whole selector text that was parsed.
    pub input: String,
    /// Byte offset into `input` where the error was found (always a char boundary).
    pub position: usize,
    /// 1-based column of `position`, counted in characters.
    pub column: usize,
    /// What the parser wanted there, e.g. "a quoted string".
    pub expected: String,
    /// What it found instead, e.g. "label `db`" or "end of input".
    pub found: String,
}

impl SelectorError {
    pub(crate) fn new(
        input: &str,
        position: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        let position = position.min(input.len());
        let column = input
            .get(..position)
            .map_or(position, |s| s.chars().count())
            + 1;
        SelectorError {
            input: input.to_string(),
            position,
            column,
            expected: expected.into(),
            found: found.into(),
        }
    }
}

/// Longest input shown whole; longer ones are shown as a window around the caret.
const WINDOW: usize = 80;

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(self, f)
    }
}

fn render(e: &SelectorError, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let header: String = if e.input.chars().count() > WINDOW {
        let cut: String = e.input.chars().take(WINDOW).collect();
        format!("{cut:?}…")
    } else {
        format!("{:?}", e.input)
    };
    writeln!(
        f,
        "selector {header}: expected {} at column {}, found {}",
        e.expected, e.column, e.found
    )?;
    let (line, caret) = snippet(&e.input, e.column - 1);
    writeln!(f, "  {line}")?;
    write!(f, "  {caret}^")
}

/// The input line to show (control characters made visible, windowed if long) and the padding
/// that puts a caret under character index `at`.
fn snippet(input: &str, at: usize) -> (String, String) {
    let chars: Vec<char> = input.chars().collect();
    let (start, end) = if chars.len() <= WINDOW {
        (0, chars.len())
    } else {
        let start = at.saturating_sub(WINDOW / 2).min(chars.len() - WINDOW);
        (start, start + WINDOW)
    };
    let mut line = String::new();
    let mut pad = String::new();
    if start > 0 {
        line.push('…');
        pad.push(' ');
    }
    for (i, &c) in chars.iter().enumerate().take(end).skip(start) {
        // One visible character per input character keeps the caret aligned.
        let shown = match c {
            '\t' => '\t',
            '\n' => '␤',
            '\r' => '␍',
            c if c.is_control() => '�',
            c => c,
        };
        line.push(shown);
        if i < at {
            // Copy tabs so the caret lines up however the terminal expands them.
            pad.push(if c == '\t' { '\t' } else { ' ' });
        }
    }
    if end < chars.len() {
        line.push('…');
    }
    (line, pad)
}
