//! How every command prints: `-o text|json|yaml` for data, tables whose columns fit their
//! content, and a closed pipe (`wiremesh ... | head`) that ends the process quietly instead of
//! panicking.

use std::io::Write as _;

use serde::Serialize;

/// `-o` / `--output` of every command that prints data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: a verdict or summary line first, then details.
    #[default]
    Text,
    /// For scripts: one JSON document (the schemas are in docs/).
    Json,
    /// The same data as YAML.
    Yaml,
}

/// The `-o` flag, flattened into each command that prints data.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub format: OutputFormat,
}

/// Writes `text` to stdout. A reader that went away (EPIPE, e.g. `| head`) ends the process
/// with status 0, as it would a shell tool killed by SIGPIPE, instead of a panic; any other
/// write error ends it with status 2 and says why.
pub fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let result = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("wiremesh: writing to stdout: {e}");
        std::process::exit(2);
    }
}

/// `print!` that never panics on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!($($arg)*))
    };
}

/// `println!` that never panics on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout("\n")
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// An error encoding a report as JSON or YAML.
#[derive(Debug, thiserror::Error)]
#[error("encoding the output as {format}: {message}")]
pub struct EncodeError {
    pub format: &'static str,
    pub message: String,
}

/// `value` in `format`: `text` renders it for people, JSON and YAML serialize it.
pub fn render<T: Serialize>(
    value: &T,
    format: OutputFormat,
    text: impl FnOnce(&T) -> String,
) -> Result<String, EncodeError> {
    match format {
        OutputFormat::Text => Ok(text(value)),
        OutputFormat::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| EncodeError {
                format: "JSON",
                message: e.to_string(),
            }),
        OutputFormat::Yaml => serde_norway::to_string(value).map_err(|e| EncodeError {
            format: "YAML",
            message: e.to_string(),
        }),
    }
}

/// Prints `value` in `format` (see [`render`]).
pub fn print<T: Serialize>(
    value: &T,
    format: OutputFormat,
    text: impl FnOnce(&T) -> String,
) -> Result<(), EncodeError> {
    write_stdout(&render(value, format, text)?);
    Ok(())
}

/// A table whose columns are as wide as their widest cell (long node names, IPv6 endpoints),
/// separated by two spaces; right-aligned columns are for numbers.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Column titles; a title starting with `>` is right-aligned (the `>` is not shown).
    pub fn new(titles: &[&str]) -> Table {
        Table {
            header: titles
                .iter()
                .map(|t| t.trim_start_matches('>').to_string())
                .collect(),
            right: titles.iter().map(|t| t.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, each line prefixed with `indent`; trailing spaces trimmed.
    pub fn render(&self, indent: &str) -> String {
        let columns = self.header.len();
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, cell) in row.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    line.push_str(&format!("{cell:>w$}"));
                } else {
                    line.push_str(&format!("{cell:<w$}"));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_the_longest_cell() {
        let mut t = Table::new(&["NODE", "ENDPOINT", ">RX"]);
        t.row(vec![
            "a-very-long-node-name.example.com".into(),
            "[fd00:30::1]:51821".into(),
            "1.0 KiB".into(),
        ]);
        t.row(vec!["n2".into(), "10.0.0.2:51820".into(), "0 B".into()]);
        let text = t.render("");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NODE                               ENDPOINT                 RX"
        );
        assert_eq!(
            lines[1],
            "a-very-long-node-name.example.com  [fd00:30::1]:51821  1.0 KiB"
        );
        assert_eq!(
            lines[2],
            "n2                                 10.0.0.2:51820          0 B"
        );
    }

    #[test]
    fn json_and_yaml_carry_the_same_data() {
        #[derive(Serialize)]
        struct R {
            a: u32,
        }
        let json = render(&R { a: 1 }, OutputFormat::Json, |_| String::new()).expect("json");
        let yaml = render(&R { a: 1 }, OutputFormat::Yaml, |_| String::new()).expect("yaml");
        assert_eq!(json.trim(), "{\n  \"a\": 1\n}");
        assert_eq!(yaml.trim(), "a: 1");
    }
}
