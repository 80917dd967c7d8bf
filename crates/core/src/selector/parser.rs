//! Recursive-descent parser with Calico's grammar and precedence
//! (`libcalico-go/lib/selector/parser/parser.go`):
//!
//! ```text
//! selector := <empty> | or_expr
//! or_expr  := and_expr ( "||" and_expr )*
//! and_expr := op ( "&&" op )*
//! op       := "!"* ( has(L) | all() | global() | "(" or_expr ")" | L binop S
//!                  | L in "{" [S ("," S)* [","]] "}" | L not in "{" ... "}" )
//! ```

use std::collections::BTreeSet;

use super::ast::Expr;
use super::error::SelectorError;
use super::lexer::{EXPECTED_OPERATOR, LexError, Lexer, TokKind, Token};

/// Deepest parenthesis nesting accepted. Calico has no limit (Go stacks grow); we need one so
/// hostile input cannot overflow the stack. Real selectors nest a few levels at most.
pub const MAX_DEPTH: usize = 100;

const EXPECTED_EXPR: &str = "a label expression";

pub(crate) fn parse(input: &str) -> Result<Expr, SelectorError> {
    let mut p = Parser {
        input,
        lexer: Lexer::new(input),
        peeked: None,
        depth: 0,
    };
    // Empty or all-space input means all(), as in Calico.
    if p.peek(EXPECTED_EXPR)?.kind == TokKind::Eof {
        return Ok(Expr::All);
    }
    let expr = p.or_expr()?;
    let tok = p.bump(p.after_expr())?;
    if tok.kind != TokKind::Eof {
        return Err(p.unexpected(&tok, p.after_expr()));
    }
    Ok(expr)
}

struct Parser<'a> {
    input: &'a str,
    lexer: Lexer<'a>,
    peeked: Option<Token>,
    depth: usize,
}

impl Parser<'_> {
    /// Turns a lexical error into a positioned error; a bare "unexpected character" is worded
    /// with what the parser wanted here.
    fn lex_error(&self, e: LexError, expected: &'static str) -> SelectorError {
        SelectorError::new(
            self.input,
            e.position,
            e.expected.unwrap_or(expected),
            e.found,
        )
    }

    fn peek(&mut self, expected: &'static str) -> Result<&Token, SelectorError> {
        let tok = match self.peeked.take() {
            Some(tok) => tok,
            None => self
                .lexer
                .next_token()
                .map_err(|e| self.lex_error(e, expected))?,
        };
        Ok(self.peeked.insert(tok))
    }

    fn bump(&mut self, expected: &'static str) -> Result<Token, SelectorError> {
        match self.peeked.take() {
            Some(tok) => Ok(tok),
            None => self
                .lexer
                .next_token()
                .map_err(|e| self.lex_error(e, expected)),
        }
    }

    fn unexpected(&self, tok: &Token, expected: &str) -> SelectorError {
        SelectorError::new(self.input, tok.start, expected, tok.describe())
    }

    /// What may follow a complete operation at the current nesting depth.
    fn after_expr(&self) -> &'static str {
        if self.depth > 0 {
            "`&&`, `||` or `)`"
        } else {
            "`&&`, `||` or end of input"
        }
    }

    fn or_expr(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.and_expr()?];
        while self.peek(self.after_expr())?.kind == TokKind::Or {
            self.bump(EXPECTED_EXPR)?;
            terms.push(self.and_expr()?);
        }
        Ok(single_or(terms, Expr::Or))
    }

    fn and_expr(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.op()?];
        while self.peek(self.after_expr())?.kind == TokKind::And {
            self.bump(EXPECTED_EXPR)?;
            terms.push(self.op()?);
        }
        Ok(single_or(terms, Expr::And))
    }

    fn op(&mut self) -> Result<Expr, SelectorError> {
        // A run of `!` collapses to one negation or none, as in Calico.
        let mut negated = false;
        while self.peek(EXPECTED_EXPR)?.kind == TokKind::Not {
            self.bump(EXPECTED_EXPR)?;
            negated = !negated;
        }
        let tok = self.bump(EXPECTED_EXPR)?;
        let expr = match tok.kind {
            TokKind::Has(label) => Expr::Has(label),
            TokKind::All => Expr::All,
            TokKind::Global => Expr::Global,
            TokKind::Label(label) => self.label_op(label)?,
            TokKind::LParen => {
                if self.depth >= MAX_DEPTH {
                    return Err(SelectorError::new(
                        self.input,
                        tok.start,
                        format!("at most {MAX_DEPTH} nested parentheses"),
                        "one more `(`",
                    ));
                }
                self.depth += 1;
                let inner = self.or_expr()?;
                let close = self.bump(self.after_expr())?;
                if close.kind != TokKind::RParen {
                    return Err(self.unexpected(&close, self.after_expr()));
                }
                self.depth -= 1;
                inner
            }
            _ => return Err(self.unexpected(&tok, EXPECTED_EXPR)),
        };
        Ok(if negated { expr.negated() } else { expr })
    }

    /// The rest of `L op S` or `L [not] in {...}` after the label.
    fn label_op(&mut self, label: String) -> Result<Expr, SelectorError> {
        let op = self.bump(EXPECTED_OPERATOR)?;
        let make: fn(String, String) -> Expr = match op.kind {
            TokKind::Eq => Expr::Eq,
            TokKind::Ne => Expr::Ne,
            TokKind::Contains => Expr::Contains,
            TokKind::StartsWith => Expr::StartsWith,
            TokKind::EndsWith => Expr::EndsWith,
            TokKind::In | TokKind::NotIn => {
                let set = self.set()?;
                return Ok(if op.kind == TokKind::In {
                    Expr::In(label, set)
                } else {
                    Expr::NotIn(label, set)
                });
            }
            _ => return Err(self.unexpected(&op, EXPECTED_OPERATOR)),
        };
        const EXPECTED_STRING: &str = "a quoted string";
        let value = self.bump(EXPECTED_STRING)?;
        match value.kind {
            TokKind::Str(s) => Ok(make(label, s)),
            _ => Err(self.unexpected(&value, EXPECTED_STRING)),
        }
    }

    /// `{ "a", "b", }`: items are de-duplicated and sorted (bytewise, as Go's sort.Strings).
    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        const EXPECTED_BRACE: &str = "`{` starting a set of quoted strings";
        const EXPECTED_ITEM: &str = "a quoted string or `}`";
        const EXPECTED_SEP: &str = "`,` or `}`";
        let open = self.bump(EXPECTED_BRACE)?;
        if open.kind != TokKind::LBrace {
            return Err(self.unexpected(&open, EXPECTED_BRACE));
        }
        let mut items = BTreeSet::new();
        let mut expected = EXPECTED_ITEM;
        loop {
            let tok = self.bump(expected)?;
            match tok.kind {
                TokKind::RBrace => return Ok(items),
                TokKind::Str(s) if expected == EXPECTED_ITEM => {
                    items.insert(s);
                    expected = EXPECTED_SEP;
                }
                // A comma only after an item, so `{,}` and `{"a",,}` are errors as in Calico.
                TokKind::Comma if expected == EXPECTED_SEP => expected = EXPECTED_ITEM,
                _ => return Err(self.unexpected(&tok, expected)),
            }
        }
    }
}

/// One term stays itself; several become an And/Or node.
fn single_or(mut terms: Vec<Expr>, make: fn(Vec<Expr>) -> Expr) -> Expr {
    if terms.len() == 1
        && let Some(only) = terms.pop()
    {
        return only;
    }
    make(terms)
}
