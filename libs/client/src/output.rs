//! How results are printed: tables that fit the terminal for people, JSON or YAML of the
//! API's own resources for scripts (`--output`), colours only when standard output is a
//! terminal and `NO_COLOR` is not set.

use std::io::{IsTerminal, Write};

use anstyle::{AnsiColor, Style};
use serde_json::Value;

use crate::Error;

/// The output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for people.
    Table,
    /// The API's JSON, one document.
    Json,
    /// The API's resource as YAML.
    Yaml,
}

/// Where and how a command prints.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// The chosen format.
    pub format: Format,
    /// Whether to colour.
    pub color: bool,
    /// The terminal's width, when standard output is one.
    pub width: Option<u16>,
}

impl Output {
    /// The output for `format` on this process's standard output.
    pub fn detect(format: Format) -> Self {
        let stdout = std::io::stdout();
        let terminal = stdout.is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|term| term == "dumb");
        Self {
            format,
            color: terminal && !no_color && !dumb,
            width: terminal
                .then(|| terminal_size::terminal_size_of(&stdout))
                .flatten()
                .map(|(terminal_size::Width(w), _)| w),
        }
    }

    /// Prints `value` as JSON or YAML; for a table, calls `table` to print it.
    pub fn print(&self, value: &Value, table: impl FnOnce(&Self) -> String) -> Result<(), Error> {
        let text = match self.format {
            Format::Json => {
                let mut text =
                    serde_json::to_string_pretty(value).expect("JSON values always serialize");
                text.push('\n');
                text
            }
            Format::Yaml => serde_norway::to_string(value)
                .map_err(|e| Error::Usage(format!("cannot write YAML: {e}")))?,
            Format::Table => table(self),
        };
        write_stdout(&text)
    }

    /// A table of `rows` under `header`, one line per row, fitted to the terminal's width.
    /// Columns come in order of importance: while the table is too wide, the widest column
    /// but the first (the key, never cut) is narrowed down to a readable width (its header's,
    /// and at least 12 columns), its cells ending in `…`; when none can be narrowed further,
    /// the last column is left out. Cells may carry colours.
    pub fn table(&self, header: &[&str], rows: Vec<Vec<String>>) -> String {
        use tabled::settings::{Padding, Style, Width, object::Columns};
        const GAP: usize = 2;
        const READABLE: usize = 12;
        let first_line = |cell: &str| cell.lines().next().unwrap_or("").to_owned();
        let header: Vec<String> = header
            .iter()
            .map(|h| self.bold(&h.to_ascii_uppercase()))
            .collect();
        let mut rows: Vec<Vec<String>> = rows
            .iter()
            .map(|row| row.iter().map(|cell| first_line(cell)).collect())
            .collect();
        let natural: Vec<usize> = (0..header.len())
            .map(|index| {
                std::iter::once(&header)
                    .chain(rows.iter())
                    .filter_map(|row| row.get(index))
                    .map(|cell| visible_width(cell))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let narrowest: Vec<usize> = (0..header.len())
            .map(|index| natural[index].min(visible_width(&header[index]).max(READABLE)))
            .collect();
        let mut widths = natural.clone();
        if let Some(limit) = self.width.map(usize::from) {
            let total = |widths: &[usize]| {
                widths.iter().sum::<usize>() + GAP * widths.len().saturating_sub(1)
            };
            while total(&widths) > limit {
                let widest = (1..widths.len())
                    .filter(|&i| widths[i] > narrowest[i])
                    .max_by_key(|&i| widths[i]);
                match widest {
                    Some(index) => widths[index] -= 1,
                    None if widths.len() > 2 => {
                        widths.pop();
                    }
                    None => break, // as narrow as it goes: the terminal wraps the rest
                }
            }
        }
        let shown = widths.len();
        let mut builder = tabled::builder::Builder::default();
        builder.push_record(header.into_iter().take(shown));
        for row in &mut rows {
            row.truncate(shown);
            builder.push_record(std::mem::take(row));
        }
        let mut table = builder.build();
        table.with(Style::empty()).with(Padding::new(0, GAP, 0, 0));
        for (index, (width, natural)) in widths.iter().zip(&natural).enumerate() {
            if width < natural {
                table.modify(Columns::one(index), Width::truncate(*width).suffix("…"));
            }
        }
        let mut text = String::new();
        for line in table.to_string().lines() {
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// `pairs` as aligned `key  value` lines.
    pub fn fields(&self, pairs: &[(&str, String)]) -> String {
        let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut text = String::new();
        for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
            let padded = format!("{key:<width$}");
            text.push_str(&self.bold(&padded));
            text.push_str("  ");
            text.push_str(value);
            text.push('\n');
        }
        text
    }

    /// A job's or node's status, coloured by what it means.
    pub fn status(&self, status: &str) -> String {
        let color = match status {
            "succeeded" | "up" | "active" | "healthy" => Some(AnsiColor::Green),
            "failed" | "timed_out" | "lost" | "quarantined" | "down" | "unreachable"
            | "deregistered" => Some(AnsiColor::Red),
            "running" | "draining" => Some(AnsiColor::Cyan),
            "pending" | "scheduled" | "retrying" | "cordoned" | "unknown" | "suspect" => {
                Some(AnsiColor::Yellow)
            }
            _ => None,
        };
        match color {
            Some(color) => self.paint(Style::new().fg_color(Some(color.into())), status),
            None => status.to_owned(),
        }
    }

    /// `text` in bold.
    pub fn bold(&self, text: &str) -> String {
        self.paint(Style::new().bold(), text)
    }

    /// `text` dimmed.
    pub fn dim(&self, text: &str) -> String {
        self.paint(Style::new().dimmed(), text)
    }

    fn paint(&self, style: Style, text: &str) -> String {
        if self.color {
            format!("{style}{text}{style:#}")
        } else {
            text.to_owned()
        }
    }
}

/// `text` without its ANSI escape sequences.
pub fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// How many columns `text` takes on a terminal (characters, escape sequences aside).
fn visible_width(text: &str) -> usize {
    strip_ansi(text).chars().count()
}

/// Writes `text` to standard output; a closed pipe (`capstan ls | head`) is not an error.
pub fn write_stdout(text: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io(error)),
        _ => Ok(()),
    }
}

/// The string at `pointer` in `value` (`""` when absent; numbers and booleans as text).
pub fn text(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The array under `key` of `value` (none when absent): a list answer's items.
pub fn items(value: &Value, key: &str) -> Vec<Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// An RFC 3339 instant at `pointer`, shortened to the second and in UTC (`2026-12-03 16:20:01`).
pub fn instant(value: &Value, pointer: &str) -> String {
    let raw = text(value, pointer);
    match time::OffsetDateTime::parse(&raw, &time::format_description::well_known::Rfc3339) {
        Ok(at) => {
            let at = at.to_offset(time::UtcOffset::UTC);
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )
        }
        Err(_) => raw,
    }
}

/// `key=value` pairs of the object at `pointer`, sorted, comma-separated.
pub fn pairs(value: &Value, pointer: &str) -> String {
    let Some(Value::Object(map)) = value.pointer(pointer) else {
        return String::new();
    };
    let mut pairs: Vec<String> = map
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
            )
        })
        .collect();
    pairs.sort();
    pairs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Output {
        Output {
            format: Format::Table,
            color: false,
            width: Some(40),
        }
    }

    #[test]
    fn a_table_fits_the_terminal_width_it_was_given_keeping_its_first_column_whole() {
        let long = "x".repeat(200);
        let id = "01JD8Z3W6X2V4Q9R7T5Y1M0K3N";
        let text = plain().table(
            &["id", "command", "status"],
            vec![vec![id.into(), long, "succeeded".into()]],
        );
        for line in text.lines() {
            assert!(line.chars().count() <= 40, "{line:?} is wider than 40");
        }
        assert!(text.starts_with("ID  "), "{text}");
        assert!(text.contains(id), "the key is never cut: {text}");
        assert!(text.contains('…'), "a cut cell says so: {text}");
        assert_eq!(text.lines().count(), 2, "one line per row: {text}");
    }

    #[test]
    fn on_a_narrow_terminal_the_last_columns_are_left_out_before_cells_become_unreadable() {
        let narrow = Output {
            width: Some(56),
            ..plain()
        };
        let text = narrow.table(
            &["id", "name", "status", "node", "created"],
            vec![vec![
                "01JD8Z3W6X2V4Q9R7T5Y1M0K3N".into(),
                "a-rather-long-job-name".into(),
                "succeeded".into(),
                "exec-1".into(),
                "2026-12-03 16:20:01".into(),
            ]],
        );
        assert!(text.contains("succeeded"), "the status stays whole: {text}");
        assert!(
            !text.contains("CREATED"),
            "the last column goes first: {text}"
        );
        for line in text.lines() {
            assert!(line.chars().count() <= 56, "{line:?} is wider than 56");
        }
    }

    #[test]
    fn coloured_cells_line_up_as_plain_ones_do() {
        let coloured = Output {
            color: true,
            width: None,
            ..plain()
        };
        let text = coloured.table(
            &["id", "status", "node"],
            vec![
                vec!["a".into(), coloured.status("failed"), "exec-1".into()],
                vec!["b".into(), coloured.status("succeeded"), "exec-2".into()],
            ],
        );
        let columns: Vec<usize> = strip_ansi(&text)
            .lines()
            .map(|line| line.find("exec").unwrap_or(usize::MAX))
            .skip(1)
            .collect();
        assert_eq!(columns[0], columns[1], "{text:?}");
    }

    #[test]
    fn colours_appear_only_when_asked_for() {
        let coloured = Output {
            color: true,
            ..plain()
        };
        assert_eq!(plain().status("failed"), "failed");
        assert!(coloured.status("failed").contains("\u{1b}["));
        assert!(coloured.status("failed").contains("failed"));
    }

    #[test]
    fn instants_are_shown_to_the_second_in_utc() {
        let value = serde_json::json!({"at": "2026-12-03T18:20:01.123456+02:00", "bad": "soon"});
        assert_eq!(instant(&value, "/at"), "2026-12-03 16:20:01");
        assert_eq!(instant(&value, "/bad"), "soon");
        assert_eq!(instant(&value, "/missing"), "");
    }
}
