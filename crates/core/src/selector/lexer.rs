//! Tokenizer for the selector language, following Calico's
//! `libcalico-go/lib/selector/tokenizer` byte for byte in what it accepts.
//!
//! The lexer is pulled one token at a time by the parser, so the first error in the input is the
//! one reported, and a generic "unexpected character" can be worded with what the parser wanted
//! at that point.

/// Longest label Calico accepts (`tokenizer.MaxLabelLength`).
pub const MAX_LABEL_LEN: usize = 512;

/// What the parser is told when a label is not followed by an operator.
pub(crate) const EXPECTED_OPERATOR: &str =
    "an operator (==, !=, in, not in, contains, starts with, ends with)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokKind {
    Label(String),
    Str(String),
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    In,
    NotIn,
    Not,
    Contains,
    StartsWith,
    EndsWith,
    All,
    Has(String),
    Global,
    LParen,
    RParen,
    And,
    Or,
    Eof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: TokKind,
    /// Byte offset of the token's first character.
    pub start: usize,
}

impl Token {
    /// How the token is named in an error's "found ..." part.
    pub fn describe(&self) -> String {
        match &self.kind {
            TokKind::Label(l) => format!("label `{}`", truncate(l)),
            TokKind::Str(s) => format!("string `{}`", truncate(s)),
            TokKind::Has(l) => format!("`has({})`", truncate(l)),
            TokKind::Eof => "end of input".to_string(),
            other => format!("`{}`", punct(other)),
        }
    }
}

fn punct(kind: &TokKind) -> &'static str {
    match kind {
        TokKind::LBrace => "{",
        TokKind::RBrace => "}",
        TokKind::Comma => ",",
        TokKind::Eq => "==",
        TokKind::Ne => "!=",
        TokKind::In => "in",
        TokKind::NotIn => "not in",
        TokKind::Not => "!",
        TokKind::Contains => "contains",
        TokKind::StartsWith => "starts with",
        TokKind::EndsWith => "ends with",
        TokKind::All => "all()",
        TokKind::Global => "global()",
        TokKind::LParen => "(",
        TokKind::RParen => ")",
        TokKind::And => "&&",
        TokKind::Or => "||",
        // Carry a value; described by Token::describe.
        TokKind::Label(_) | TokKind::Str(_) | TokKind::Has(_) | TokKind::Eof => "",
    }
}

/// A lexical error. `expected` is `None` for a plain "this character cannot start a token",
/// where the parser knows better what it wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LexError {
    pub position: usize,
    pub expected: Option<&'static str>,
    pub found: String,
}

/// Calico's label character set: `[A-Za-z0-9_./-]`. ASCII only.
pub fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

/// Only space and tab count as whitespace (a newline is an error, as in Calico).
fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Shortens a value quoted in an error message.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 32;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Names what starts at `pos`, for "found ..." in lexical errors.
pub(crate) fn describe_at(input: &str, pos: usize) -> String {
    let rest = input.get(pos..).unwrap_or("");
    let Some(c) = rest.chars().next() else {
        return "end of input".to_string();
    };
    if c.is_ascii() && is_label_byte(c as u8) {
        let word_len = rest.bytes().take_while(|b| is_label_byte(*b)).count();
        return format!("`{}`", truncate(&rest[..word_len]));
    }
    match c {
        '\n' => "a newline".to_string(),
        '\r' => "a carriage return".to_string(),
        c if c.is_control() || c.is_whitespace() => format!("character {c:?}"),
        c => format!("`{c}`"),
    }
}

pub(crate) struct Lexer<'a> {
    input: &'a str,
    pos: usize,
    /// Calico recognises word operators only straight after a label.
    after_label: bool,
}

impl<'a> Lexer<'a> {
    pub fn new(input: &'a str) -> Self {
        Lexer {
            input,
            pos: 0,
            after_label: false,
        }
    }

    fn rest(&self) -> &'a str {
        // `pos` only ever lands after an ASCII byte or at the end, so it is a char boundary.
        self.input.get(self.pos..).unwrap_or("")
    }

    fn skip_space(&mut self) {
        while self
            .input
            .as_bytes()
            .get(self.pos)
            .copied()
            .is_some_and(is_space)
        {
            self.pos += 1;
        }
    }

    fn err(&self, position: usize, expected: Option<&'static str>) -> LexError {
        LexError {
            position,
            expected,
            found: describe_at(self.input, position),
        }
    }

    /// Consumes `word` if the input continues with it.
    fn eat(&mut self, word: &str) -> bool {
        if self.rest().starts_with(word) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// Consumes a sequence of words separated by zero or more spaces, followed by a word boundary
    /// (Calico's `cutMultiWordPrefixCheckBreak`; so `notin` and `startswith` are accepted).
    fn eat_words(&mut self, words: &[&str]) -> bool {
        let saved = self.pos;
        for word in words {
            if !self.eat(word) {
                self.pos = saved;
                return false;
            }
            // Calico trims after every word, including the last; harmless as spaces are skipped
            // before the next token anyway.
            self.skip_space();
        }
        let boundary = match self.input.as_bytes().get(self.pos) {
            None => true,
            Some(b) => !is_label_byte(*b),
        };
        if !boundary {
            self.pos = saved;
        }
        boundary
    }

    /// Reads a label at the current position (Calico's `cutIdentifier`).
    fn label(&mut self) -> Result<String, LexError> {
        let start = self.pos;
        let len = self
            .rest()
            .bytes()
            .take_while(|b| is_label_byte(*b))
            .count();
        if len == 0 {
            return Err(self.err(start, None));
        }
        if len > MAX_LABEL_LEN {
            return Err(LexError {
                position: start,
                expected: Some("a label of at most 512 characters"),
                found: format!("a label of {len} characters"),
            });
        }
        self.pos += len;
        Ok(self.input[start..start + len].to_string())
    }

    /// The `)` closing `has(`, `all(` or `global(`, after optional spaces.
    fn close_call(&mut self, expected: &'static str) -> Result<(), LexError> {
        self.skip_space();
        if self.eat(")") {
            Ok(())
        } else {
            Err(self.err(self.pos, Some(expected)))
        }
    }

    pub fn next_token(&mut self) -> Result<Token, LexError> {
        self.skip_space();
        let start = self.pos;
        let Some(&b) = self.input.as_bytes().get(start) else {
            return Ok(Token {
                kind: TokKind::Eof,
                start,
            });
        };
        let kind = match b {
            b'(' => self.single(TokKind::LParen),
            b')' => self.single(TokKind::RParen),
            b'{' => self.single(TokKind::LBrace),
            b'}' => self.single(TokKind::RBrace),
            b',' => self.single(TokKind::Comma),
            b'"' | b'\'' => {
                // No escapes: the literal ends at the next matching quote.
                let body = &self.input[start + 1..];
                let Some(len) = body.find(b as char) else {
                    return Err(LexError {
                        position: start,
                        expected: Some(if b == b'"' {
                            "a closing `\"` for this string"
                        } else {
                            "a closing `'` for this string"
                        }),
                        found: "end of input".to_string(),
                    });
                };
                self.pos = start + 1 + len + 1;
                TokKind::Str(body[..len].to_string())
            }
            b'=' => self.pair("==", TokKind::Eq)?,
            b'&' => self.pair("&&", TokKind::And)?,
            b'|' => self.pair("||", TokKind::Or)?,
            b'!' => {
                if self.eat("!=") {
                    TokKind::Ne
                } else {
                    self.single(TokKind::Not)
                }
            }
            _ if self.after_label => {
                if self.eat_words(&["contains"]) {
                    TokKind::Contains
                } else if self.eat_words(&["starts", "with"]) {
                    TokKind::StartsWith
                } else if self.eat_words(&["ends", "with"]) {
                    TokKind::EndsWith
                } else if self.eat_words(&["not", "in"]) {
                    TokKind::NotIn
                } else if self.eat_words(&["in"]) {
                    TokKind::In
                } else {
                    return Err(self.err(start, Some(EXPECTED_OPERATOR)));
                }
            }
            _ => {
                // The parenthesis must follow the name directly: `has (x)` is label `has`.
                if self.eat("has(") {
                    self.skip_space();
                    if self.rest().bytes().next().is_none_or(|b| !is_label_byte(b)) {
                        return Err(self.err(self.pos, Some("a label name inside `has(...)`")));
                    }
                    let label = self.label()?;
                    self.close_call("`)` to close `has(`")?;
                    TokKind::Has(label)
                } else if self.eat("all(") {
                    self.close_call("`)` after `all(`")?;
                    TokKind::All
                } else if self.eat("global(") {
                    self.close_call("`)` after `global(`")?;
                    TokKind::Global
                } else {
                    TokKind::Label(self.label()?)
                }
            }
        };
        self.after_label = matches!(kind, TokKind::Label(_));
        Ok(Token { kind, start })
    }

    fn single(&mut self, kind: TokKind) -> TokKind {
        self.pos += 1;
        kind
    }

    /// Two-character operators whose first character alone is an error (`=`, `&`, `|`).
    fn pair(&mut self, op: &'static str, kind: TokKind) -> Result<TokKind, LexError> {
        if self.eat(op) {
            Ok(kind)
        } else {
            Err(LexError {
                position: self.pos,
                expected: Some(match op {
                    "==" => "`==`",
                    "&&" => "`&&`",
                    _ => "`||`",
                }),
                found: format!("a lone `{}`", &op[..1]),
            })
        }
    }
}
