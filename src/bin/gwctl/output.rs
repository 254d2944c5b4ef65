//! How `gwctl` prints things: aligned tables, JSON, or YAML.
//!
//! Everything for stdout goes through [`emit`]: a reader that stops early (`gwctl … |
//! head -1`) ends `gwctl` quietly with exit code 0, as it does `grep` or `rg`.
//!
//! YAML comes from a small emitter over `serde_json::Value` (below) rather than a YAML
//! crate: the output is a plain tree of maps, lists and scalars, and the maintained YAML
//! crates either pull a libyaml port or are unmaintained (`serde_yaml` is archived).

use chrono::{DateTime, Utc};
use gateway_client::{
    AuditEntry, CatalogEntry, CloudEvent, Delivery, KeyInfo, NewKey, Operation, Page, Quotas,
    Resource, ResourceType, Tenant, Webhook, WebhookWithSecret, Zone,
};
use serde::Serialize;
use serde_json::Value;
use std::fmt::Write;

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Pretty JSON, the API's own shapes (`events` and `watch`: one object per line).
    Json,
    /// YAML, the API's own shapes (`events` and `watch`: one document per item).
    Yaml,
}

/// Something that prints as rows of a table.
pub trait Tabular: Serialize {
    /// Column headers.
    const HEADERS: &'static [&'static str];
    /// One row per item (usually one).
    fn rows(&self) -> Vec<Vec<String>>;
}

/// What became of output written to stdout.
#[derive(Debug)]
enum Written {
    /// All of it is out.
    Out,
    /// The reader went away (`EPIPE`): nothing more will be read.
    Closed,
    /// Writing failed another way.
    Failed(std::io::Error),
}

/// Writes `bytes` to `out` and flushes them.
fn write_out(out: &mut impl std::io::Write, bytes: &[u8]) -> Written {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Written::Out,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Written::Closed,
        Err(e) => Written::Failed(e),
    }
}

/// Writes `text` to stdout. When the reader has gone away (`gwctl … | head -1`), the
/// process ends at once with exit code 0 and no message; when stdout cannot be
/// written otherwise (a full disk), with a message and exit code 3.
pub fn emit(text: impl AsRef<[u8]>) {
    match write_out(&mut std::io::stdout().lock(), text.as_ref()) {
        Written::Out => {}
        Written::Closed => std::process::exit(0),
        Written::Failed(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(3);
        }
    }
}

/// Writes `text` and a line break to stdout ([`emit`]).
pub fn emit_line(text: &str) {
    emit(format!("{text}\n"));
}

/// Prints one item.
pub fn one<T: Tabular>(item: &T, format: Format) {
    emit(render(item, &item.rows(), T::HEADERS, format));
}

/// Prints a list.
pub fn many<T: Tabular>(items: &[T], format: Format) {
    let rows = items.iter().flat_map(Tabular::rows).collect::<Vec<_>>();
    emit(render(&items, &rows, T::HEADERS, format));
}

/// The column headers of `T`, for rows printed one at a time ([`line()`]).
pub fn table_header<T: Tabular>() -> String {
    T::HEADERS.join("\t")
}

/// Prints one item as it comes: a tab-separated row, a JSON line, or a YAML document.
pub fn line<T: Tabular>(item: &T, format: Format) {
    match format {
        Format::Table => {
            for row in item.rows() {
                emit_line(&row.join("\t"));
            }
        }
        Format::Json => emit_line(&serde_json::to_string(item).expect("serializes")),
        Format::Yaml => emit(format!(
            "---\n{}",
            yaml(&serde_json::to_value(item).expect("serializes"))
        )),
    }
}

/// Prints a page; in a table the next cursor goes to stderr, so stdout stays the rows.
pub fn page<T: Tabular>(page: &Page<T>, format: Format) {
    if format == Format::Table {
        many(&page.items, format);
        if let Some(c) = &page.next_cursor {
            eprintln!("more: --cursor {c}");
        }
    } else {
        emit(render(page, &[], &[], format));
    }
}

fn render(value: &impl Serialize, rows: &[Vec<String>], headers: &[&str], f: Format) -> String {
    match f {
        Format::Table => table(headers, rows),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(value).expect("serializes");
            s.push('\n');
            s
        }
        Format::Yaml => yaml(&serde_json::to_value(value).expect("serializes")),
    }
}

/// Aligned columns, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// YAML for a JSON value: block maps and lists, scalars quoted when plain YAML would
/// misread them.
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => block(&mut out, value, 0),
        Value::Array(a) if !a.is_empty() => block(&mut out, value, 0),
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
    out
}

fn block(out: &mut String, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                let _ = write!(out, "{pad}{}:", yaml_str(k));
                nested(out, v, indent + 2, false);
            }
        }
        Value::Array(a) => {
            for v in a {
                let _ = write!(out, "{pad}-");
                nested(out, v, indent + 2, true);
            }
        }
        _ => unreachable!("only containers"),
    }
}

fn nested(out: &mut String, v: &Value, indent: usize, in_list: bool) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            if in_list {
                // The first key goes on the dash's line.
                let mut first = String::new();
                block(&mut first, v, indent);
                out.push(' ');
                out.push_str(&first[indent..]);
            } else {
                out.push('\n');
                block(out, v, indent);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            block(out, v, indent);
        }
        scalar => {
            out.push(' ');
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string as a YAML scalar: plain only where no YAML parser (1.1 or 1.2) reads it as
/// anything but a string, else double-quoted.
fn yaml_str(s: &str) -> String {
    if plain_yaml(s) || is_uuid(s) {
        s.to_owned()
    } else {
        // A JSON string is a valid double-quoted YAML scalar, but for the line breaks
        // YAML has and JSON does not (NEL, LS, PS), which JSON leaves raw and a YAML
        // parser would read as a space: YAML's own escapes for them.
        serde_json::to_string(s)
            .expect("strings serialize")
            .replace('\u{85}', "\\N")
            .replace('\u{2028}', "\\L")
            .replace('\u{2029}', "\\P")
    }
}

/// Whether `s` reads as the same string written plain: it starts with a letter (so is
/// no number, date, time or `.inf`), has only letters, digits and `-_./@+`, and is no
/// YAML 1.1 keyword.
fn plain_yaml(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@+".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
        )
}

/// Whether `s` is a UUID as the API writes them (8-4-4-4-12 hex digits), which no YAML
/// parser reads as a number or date.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), T::to_string)
}

impl Tabular for Resource {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "ZONE",
        "PHASE",
        "GENERATION",
        "LABELS",
        "CREATED",
    ];
    fn rows(&self) -> Vec<Vec<String>> {
        let labels = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        vec![vec![
            self.id.to_string(),
            self.name.clone(),
            self.zone.clone(),
            self.phase.as_str().into(),
            format!("{}/{}", self.observed_generation, self.generation),
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
            time(&self.created_at),
        ]]
    }
}

impl Tabular for Operation {
    const HEADERS: &'static [&'static str] = &[
        "ID", "KIND", "ACTION", "STATE", "ATTEMPT", "RESOURCE", "ERROR", "CREATED",
    ];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.id.to_string(),
            self.kind.to_string(),
            self.action.to_string(),
            self.state.to_string(),
            self.attempt.to_string(),
            self.resource_id.to_string(),
            opt(&self.error.as_ref().map(|e| e.code.clone())),
            time(&self.created_at),
        ]]
    }
}

impl Tabular for Tenant {
    const HEADERS: &'static [&'static str] = &["ID", "DISPLAY NAME", "CREATED"];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.id.clone(),
            self.display_name.clone(),
            time(&self.created_at),
        ]]
    }
}

impl Tabular for KeyInfo {
    const HEADERS: &'static [&'static str] = &[
        "ID", "NAME", "ROLE", "TENANT", "SERVICE", "ZONE", "EXPIRES", "REVOKED",
    ];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.id.to_string(),
            self.name.clone(),
            self.role.to_string(),
            opt(&self.tenant),
            opt(&self.service),
            opt(&self.zone),
            opt(&self.expires_at.as_ref().map(time)),
            opt(&self.revoked_at.as_ref().map(time)),
        ]]
    }
}

impl Tabular for NewKey {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "ROLE", "KEY"];
    fn rows(&self) -> Vec<Vec<String>> {
        let mut row = self.info.rows().remove(0);
        row.truncate(3);
        row.push(self.key.clone());
        vec![row]
    }
}

impl Tabular for Quotas {
    const HEADERS: &'static [&'static str] = &["DIMENSION", "KIND", "ZONE", "LIMIT", "USED"];
    fn rows(&self) -> Vec<Vec<String>> {
        self.limits
            .iter()
            .map(|l| {
                vec![
                    l.limit.dimension.clone(),
                    l.limit
                        .kind
                        .clone()
                        .map_or_else(|| "*".into(), |k| k.to_string()),
                    l.limit.zone.clone().unwrap_or_else(|| "*".into()),
                    l.limit.limit.to_string(),
                    l.used.to_string(),
                ]
            })
            .collect()
    }
}

impl Tabular for Zone {
    const HEADERS: &'static [&'static str] = &["NAME", "REGION", "DESCRIPTION"];
    fn rows(&self) -> Vec<Vec<String>> {
        let region = self.region.clone().unwrap_or_else(|| "-".into());
        vec![vec![self.name.clone(), region, self.description.clone()]]
    }
}

impl Tabular for ResourceType {
    const HEADERS: &'static [&'static str] = &["KIND", "PLURAL", "SERVICE", "VERSION", "ACTIONS"];
    fn rows(&self) -> Vec<Vec<String>> {
        let actions: Vec<&str> = self.actions.keys().map(String::as_str).collect();
        vec![vec![
            self.kind.to_string(),
            self.plural.clone(),
            self.service.to_string(),
            self.version.to_string(),
            actions.join(","),
        ]]
    }
}

impl Tabular for CatalogEntry {
    const HEADERS: &'static [&'static str] = &["NAME", "ATTRIBUTES"];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![self.name.clone(), self.attributes.to_string()]]
    }
}

impl Tabular for AuditEntry {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "AT",
        "PRINCIPAL",
        "TENANT",
        "ACTION",
        "TARGET",
        "OUTCOME",
        "STATUS",
    ];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.id.to_string(),
            time(&self.at),
            opt(&self.principal_name),
            opt(&self.tenant),
            self.action.clone(),
            self.target.clone(),
            self.outcome.clone(),
            self.status.to_string(),
        ]]
    }
}

impl Tabular for CloudEvent {
    const HEADERS: &'static [&'static str] = &["CURSOR", "TIME", "TYPE", "SUBJECT", "ZONE"];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            opt(&self.cursor),
            time(&self.time),
            self.event_type.to_string(),
            self.subject.clone(),
            self.zone.clone(),
        ]]
    }
}

impl Tabular for Webhook {
    const HEADERS: &'static [&'static str] =
        &["ID", "URL", "TYPES", "ENABLED", "FAILURES", "DESCRIPTION"];
    fn rows(&self) -> Vec<Vec<String>> {
        let enabled = match &self.disabled_reason {
            Some(why) if !self.enabled => format!("no ({why})"),
            _ => if self.enabled { "yes" } else { "no" }.to_owned(),
        };
        vec![vec![
            self.id.to_string(),
            self.url.clone(),
            if self.types.is_empty() {
                "*".into()
            } else {
                self.types.join(",")
            },
            enabled,
            self.failure_streak.to_string(),
            self.description.clone(),
        ]]
    }
}

impl Tabular for WebhookWithSecret {
    const HEADERS: &'static [&'static str] = &["ID", "URL", "SECRET"];
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.webhook.id.to_string(),
            self.webhook.url.clone(),
            self.secret.clone(),
        ]]
    }
}

impl Tabular for Delivery {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "EVENT",
        "TYPE",
        "STATE",
        "ATTEMPTS",
        "LAST STATUS",
        "NEXT ATTEMPT",
    ];
    fn rows(&self) -> Vec<Vec<String>> {
        let last = self
            .attempts
            .last()
            .map(|a| match (a.status_code, &a.error) {
                (Some(code), _) => code.to_string(),
                (None, Some(e)) => e.chars().take(40).collect(),
                (None, None) => "-".into(),
            });
        vec![vec![
            self.id.to_string(),
            self.event_id.to_string(),
            self.event_type.clone(),
            self.state.clone(),
            self.attempts.len().to_string(),
            opt(&last),
            opt(&self.next_attempt_at.as_ref().map(time)),
        ]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "NAME"],
            &[
                vec!["1".into(), "web".into()],
                vec!["22".into(), "db".into()],
            ],
        );
        assert_eq!(t, "ID  NAME\n1   web\n22  db\n");
    }

    #[test]
    fn yaml_quotes_every_string_a_parser_would_read_as_something_else() {
        let quoted = [
            "",
            "2026-01-01",
            "2026-01-01T00:00:00Z",
            "0x1f",
            "0o17",
            "1_000",
            "1:20",
            "10",
            "-1",
            "+1",
            "1e3",
            ".5",
            ".inf",
            "-.inf",
            ".NaN",
            "~",
            "null",
            "Null",
            "NULL",
            "true",
            "False",
            "yes",
            "No",
            "ON",
            "off",
            "y",
            "N",
            "a: b",
            "a b",
            "a#b",
            "-a",
            "@a",
            "é",
            "10.0.0.1",
            "0193abcd-0000-7000-8000-00000000000",
            "x\ny",
        ];
        for s in quoted {
            let y = yaml_str(s);
            assert_eq!(y, serde_json::to_string(s).unwrap(), "{s:?} must be quoted");
        }
        let plain = [
            "abc",
            "web-1",
            "debian-12",
            "m1.small",
            "zone-a",
            "a@b.c",
            "a+b",
            "a_b/c",
            "inf",
            "nan",
            "e5",
            "yes2",
            "onion",
            "0193abcd-0000-7000-8000-000000000000",
            "0193ABCD-0000-7000-8000-000000000000",
        ];
        for s in plain {
            assert_eq!(yaml_str(s), s, "{s:?} may stay plain");
        }
        // YAML's line breaks that JSON does not escape get YAML's escapes.
        assert_eq!(yaml_str("\u{85}x\u{2028}y\u{2029}"), r#""\Nx\Ly\P""#);
    }

    #[test]
    fn a_reader_that_went_away_is_told_apart_from_other_write_errors() {
        struct Failing(std::io::ErrorKind);
        impl std::io::Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(self.0.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let closed = write_out(&mut Failing(std::io::ErrorKind::BrokenPipe), b"x\n");
        assert!(matches!(closed, Written::Closed), "{closed:?}");
        let full = write_out(&mut Failing(std::io::ErrorKind::StorageFull), b"x\n");
        assert!(matches!(full, Written::Failed(_)), "{full:?}");
        let mut out = Vec::new();
        assert!(matches!(write_out(&mut out, b"x\n"), Written::Out));
        assert_eq!(out, b"x\n");
    }

    #[test]
    fn yaml_nests_and_quotes_what_needs_it() {
        let v = json!({"id": "abc", "n": 3, "ok": true, "none": null, "empty": {},
                       "s": "yes", "num": "10", "colon": "a: b",
                       "list": [{"a": 1, "b": [1, 2]}, "x"], "m": {"k": "v"}});
        let y = yaml(&v);
        assert_eq!(
            y,
            "colon: \"a: b\"\nempty: {}\nid: abc\nlist:\n  - a: 1\n    b:\n      - 1\n      - 2\n  - x\nm:\n  k: v\n\"n\": 3\nnone: null\nnum: \"10\"\nok: true\ns: \"yes\"\n"
        );
    }
}
