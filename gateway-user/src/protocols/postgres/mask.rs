//! Masking results in flight: the server-to-client half of a PostgreSQL session, rewritten by
//! [`crate::mask`] before the agent sees it.
//!
//! Owns the wire side of masking: which column a value belongs to (RowDescription, or the
//! statement a Bind names), what its type OID means to the engine, how each format carries it
//! (text, binary, COPY text and CSV, error fields), and rebuilding a frame when a value changed.
//! Must not decide what is sensitive (that is `mask`'s), keep a value, or log one. Frames that
//! nothing changed are passed on as the same bytes: the common case costs a scan, not a copy.
//!
//! Choices:
//! - **Types.** A masked value must still decode as its column's type. Text, varchar, bpchar,
//!   name, `"char"`, xml and JSON stay valid when masked (JSON is masked leaf by leaf). A column
//!   whose type could not carry a masked value is described to the client as `text` (OID 25) in
//!   the RowDescription: numbers, timestamps and the like when a rule names the column, and
//!   types the engine scans as text but that are not text (inet, enums, ranges, extension types),
//!   always. So `SELECT id` under a column rule reaches psql and psycopg as the text `****`.
//! - **Binary format.** Only values whose binary form is their text are scanned (the text family,
//!   the target's enums and citext, and jsonb after its version byte; arrays of them element by
//!   element). A binary value that
//!   cannot be read but may need masking is withheld: sent as NULL, counted as masked.
//! - **Column names.** `schema.table.column` comes from the target's catalog (table OID and
//!   attnum of the RowDescription), read at login; the column's own name, not an alias the
//!   agent chose, is what rules and hints see. Computed columns have only their output name.
//! - **Statements and portals.** A Bind's rows are described by its statement's Describe,
//!   remembered per statement name, and the portal keeps that description and the Bind's formats
//!   until the transaction ends, so an Execute after PortalSuspended or a later Sync reads its
//!   rows right. Rows with no description at all get detector-only text columns (binary values
//!   withheld).
//! - **COPY.** Text and CSV rows are split into fields with the statement's own options
//!   (delimiter, quote, escape), each field masked and re-escaped; `COPY table [(columns)]`
//!   gives the fields their columns (catalog order), `COPY (query)` only the detectors. Binary
//!   COPY output cannot be masked: it is dropped and the client gets an error instead (SQLSTATE
//!   0A000).
//! - **Errors and notices.** Message, detail, hint and context are scanned: a unique violation's
//!   detail echoes the duplicate value. So are NOTIFY payloads.
//!
//! ```text
//! T (RowDescription) ─ per column: catalog name, ValueType, retype? ─▶ T' (types fixed)
//! D (DataRow)        ─ per value: ColumnMasker::mask (text) / binary rules ─▶ D' (lengths fixed)
//! d (CopyData)       ─ per field: unescape, mask, escape ─▶ d'
//! E / N              ─ M, D, H, W fields ─▶ E' / N'
//! ```

use super::classify::{CopyFormat, CopyOut};
use crate::mask::{Column, ColumnMasker, MaskCounts, Masked, Masker, Splicer, ValueType};
use bytes::{BufMut, BytesMut};
use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

#[derive(Debug, thiserror::Error)]
pub enum MaskWireError {
    #[error("the server sent a malformed {0}")]
    Malformed(&'static str),
}

/// The target's user columns: `(table OID, attnum)` → column name and `schema.table.column`;
/// and its user types whose values travel as text in both formats (enums, citext), with their
/// array types.
#[derive(Debug, Default)]
pub struct Relations {
    columns: HashMap<(u32, i16), ColumnName>,
    /// Type OID → whether it is the array type.
    text_types: HashMap<u32, bool>,
    /// (schema, table) → its columns' names and qualified names, in order: what `COPY table`
    /// sends.
    tables: HashMap<(String, String), Vec<ColumnName>>,
}

/// A column's name and `schema.table.column`.
type ColumnName = (Arc<str>, Arc<str>);

/// Columns of user relations (tables, views, materialized views, foreign and partitioned
/// tables) outside the system schemas, as `Relations::from_rows` reads them.
pub const RELATIONS_SQL: &str = "SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname \
     FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg_toast%' AND c.relkind IN ('r', 'v', 'm', 'f', 'p') \
     AND a.attnum > 0 AND NOT a.attisdropped";

/// User types (OIDs from 16384) whose send function sends the text: enums, citext, and types
/// built on the text functions; with their array types. `Relations::from_rows` reads them.
pub const TEXT_TYPES_SQL: &str = "SELECT t.oid, t.typarray FROM pg_catalog.pg_type t \
     WHERE t.oid >= 16384 AND t.typsend::text IN \
     ('textsend', 'enum_send', 'citextsend', 'varcharsend', 'bpcharsend')";

impl Relations {
    /// From the rows of [`RELATIONS_SQL`] and [`TEXT_TYPES_SQL`]; rows that do not parse are
    /// skipped.
    pub fn from_rows(rows: Vec<Vec<Option<String>>>, types: Vec<Vec<Option<String>>>) -> Self {
        let mut columns = HashMap::new();
        let mut tables: HashMap<(String, String), Vec<(i16, ColumnName)>> = HashMap::new();
        for r in rows {
            let Ok([Some(oid), Some(num), Some(schema), Some(table), Some(col)]) =
                <[Option<String>; 5]>::try_from(r)
            else {
                continue;
            };
            let (Ok(oid), Ok(num)) = (oid.parse::<u32>(), num.parse::<i16>()) else {
                continue;
            };
            let qualified: Arc<str> = format!("{schema}.{table}.{col}").into();
            let name: ColumnName = (col.into(), qualified);
            tables
                .entry((schema, table))
                .or_default()
                .push((num, name.clone()));
            columns.insert((oid, num), name);
        }
        let tables = tables
            .into_iter()
            .map(|(k, mut cols)| {
                cols.sort_by_key(|c| c.0);
                (k, cols.into_iter().map(|c| c.1).collect())
            })
            .collect();
        let oid = |v: &Option<String>| v.as_deref().and_then(|o| o.parse::<u32>().ok());
        let text_types = types
            .iter()
            .flat_map(|r| {
                let scalar = r.first().and_then(oid).map(|o| (o, false));
                let array = r
                    .get(1)
                    .and_then(oid)
                    .filter(|&o| o != 0)
                    .map(|o| (o, true));
                [scalar, array]
            })
            .flatten()
            .collect();
        Self {
            columns,
            text_types,
            tables,
        }
    }

    fn get(&self, table: u32, attnum: i16) -> Option<&ColumnName> {
        self.columns.get(&(table, attnum))
    }

    /// The columns a `COPY table [(columns)]` sends, in order; none for `COPY (query)` or a
    /// table the catalog does not know.
    fn copy_columns(&self, c: &CopyOut) -> Vec<ColumnName> {
        let Some((schema, table)) = &c.table else {
            return Vec::new();
        };
        // Unqualified names resolve in `public`: the session's search_path is set to it.
        let schema = schema.as_deref().unwrap_or("public");
        let Some(cols) = self.tables.get(&(schema.to_owned(), table.clone())) else {
            return Vec::new();
        };
        if c.columns.is_empty() {
            return cols.clone();
        }
        c.columns
            .iter()
            .map(|want| {
                cols.iter()
                    .find(|(n, _)| **n == **want)
                    .cloned()
                    .unwrap_or_else(|| (want.as_str().into(), "".into()))
            })
            .collect()
    }
}

/// How a type's values travel, as far as masking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Text in both formats (binary is the text's bytes): text, varchar, bpchar, name, json…
    Textual,
    /// jsonb: text, or binary as a version byte (1) then the text.
    Jsonb,
    /// Numbers, booleans, timestamps, UUIDs, bytea: not scanned unless a rule names the column.
    Typed,
    /// Scanned as text in text format, but not text (inet, enums, extension types): a masked
    /// value would not parse as the type, and the binary form cannot be read.
    Opaque,
}

/// A type OID's `ValueType` for the engine and its [`Class`]; arrays also give their element's.
/// `rel` knows the target's own text-like types.
fn type_of(oid: u32, rel: &Relations) -> (ValueType, Class, Option<Class>) {
    match rel.text_types.get(&oid) {
        Some(false) => return (ValueType::Text, Class::Textual, None),
        Some(true) => {
            let text = ValueType::Array(Box::new(ValueType::Text));
            return (text, Class::Textual, Some(Class::Textual));
        }
        None => {}
    }
    let elem = match oid {
        1009 => Some(25),
        1015 => Some(1043),
        1014 => Some(1042),
        1003 => Some(19),
        1002 => Some(18),
        143 => Some(142),
        199 => Some(114),
        3807 => Some(3802),
        1000 => Some(16),
        1001 => Some(17),
        1005 => Some(21),
        1007 => Some(23),
        1016 => Some(20),
        1021 => Some(700),
        1022 => Some(701),
        1231 => Some(1700),
        1028 => Some(26),
        791 => Some(790),
        1182 => Some(1082),
        1183 => Some(1083),
        1115 => Some(1114),
        1185 => Some(1184),
        1270 => Some(1266),
        1187 => Some(1186),
        2951 => Some(2950),
        _ => None,
    };
    if let Some(e) = elem {
        let (ty, class) = scalar(e);
        return (ValueType::Array(Box::new(ty)), class, Some(class));
    }
    let (ty, class) = scalar(oid);
    (ty, class, None)
}

fn scalar(oid: u32) -> (ValueType, Class) {
    match oid {
        // text, varchar, bpchar, name, "char", unknown, xml
        25 | 1043 | 1042 | 19 | 18 | 705 | 142 => (ValueType::Text, Class::Textual),
        114 => (ValueType::Json, Class::Textual),
        3802 => (ValueType::Json, Class::Jsonb),
        16 => (ValueType::Boolean, Class::Typed),
        17 => (ValueType::Bytes, Class::Typed),
        // int2, int4, int8, float4, float8, numeric, oid, money
        21 | 23 | 20 | 700 | 701 | 1700 | 26 | 790 => (ValueType::Number, Class::Typed),
        // date, time, timestamp, timestamptz, timetz, interval
        1082 | 1083 | 1114 | 1184 | 1266 | 1186 => (ValueType::Timestamp, Class::Typed),
        2950 => (ValueType::Uuid, Class::Typed),
        _ => (ValueType::Text, Class::Opaque),
    }
}

/// The OID, length and modifier of `text`: what a retyped column is described as.
const TEXT_OID: u32 = 25;

/// One column's masking, resolved once per RowDescription.
struct ColPlan<'m> {
    plan: ColumnMasker<'m>,
    class: Class,
    /// Arrays: the element's class and plan (for binary arrays, read element by element).
    elem: Option<(Class, ColumnMasker<'m>)>,
    /// Described to the client as text: text-format values are masked as text.
    retyped: bool,
}

impl<'m> ColPlan<'m> {
    fn new(m: &'m Masker, rel: &Relations, f: &FieldDesc<'_>) -> Self {
        let (ty, class, elem_class) = type_of(f.type_oid, rel);
        let output = String::from_utf8_lossy(f.name);
        // The source column's own name when the catalog knows it: an alias must not dodge a rule.
        let (name, qualified) = match rel.get(f.table_oid, f.attnum) {
            Some((n, q)) => (Some(&**n), Some(&**q)),
            None => (Some(&*output), None),
        };
        let col = |ty| Column {
            name,
            qualified,
            ty,
        };
        let elem = match (&ty, elem_class) {
            (ValueType::Array(e), Some(c)) => Some((c, m.column(&col((**e).clone())))),
            _ => None,
        };
        let plan = m.column(&col(ty));
        let retyped = !plan.kept()
            && match class {
                Class::Textual | Class::Jsonb => false,
                Class::Typed => plan.rewrites_typed(),
                Class::Opaque => true,
            };
        ColPlan {
            plan,
            class,
            elem,
            retyped,
        }
    }

    /// Detector-only text, for values whose column is unknown.
    fn unknown(m: &'m Masker) -> Self {
        ColPlan {
            plan: m.column(&Column::default()),
            class: Class::Textual,
            elem: None,
            retyped: false,
        }
    }

    /// `v` masked for the client; a withheld value is counted here.
    fn value(&self, binary: bool, v: &[u8], counts: &mut MaskCounts) -> Out {
        let out = if self.plan.kept() || (!binary && self.class == Class::Typed && !self.retyped) {
            Out::Same
        } else if !binary {
            Out::from(changed(self.plan.mask(v), counts))
        } else {
            binary_value(&self.plan, self.class, self.elem.as_ref(), v, counts)
        };
        if let Out::Withheld = out {
            counts.add(&self.plan.withheld(v.len()));
        }
        out
    }
}

/// The masked bytes when `m` changed the value, counted.
fn changed(m: Masked<'_>, counts: &mut MaskCounts) -> Option<Vec<u8>> {
    counts.add(&m);
    match m.bytes {
        Cow::Owned(b) => Some(b),
        Cow::Borrowed(_) => None,
    }
}

/// What becomes of one value.
enum Out {
    Same,
    Changed(Vec<u8>),
    /// Cannot be masked in place: sent as NULL.
    Withheld,
}

impl From<Option<Vec<u8>>> for Out {
    fn from(changed: Option<Vec<u8>>) -> Self {
        changed.map_or(Out::Same, Out::Changed)
    }
}

/// A binary-format value of `class`, masked where its bytes can be read.
fn binary_value(
    plan: &ColumnMasker<'_>,
    class: Class,
    elem: Option<&(Class, ColumnMasker<'_>)>,
    v: &[u8],
    counts: &mut MaskCounts,
) -> Out {
    if let Some((ec, ep)) = elem {
        if *ec == Class::Typed && !plan.rewrites_typed() {
            return Out::Same;
        }
        return binary_array(ep, *ec, v, counts);
    }
    match class {
        Class::Textual => Out::from(changed(plan.mask(v), counts)),
        Class::Jsonb => match v.split_first() {
            Some((1, json)) => changed(plan.mask(json), counts)
                .map_or(Out::Same, |m| Out::Changed([&[1u8][..], &m].concat())),
            _ => Out::Withheld,
        },
        Class::Typed if !plan.rewrites_typed() => Out::Same,
        Class::Typed | Class::Opaque => Out::Withheld,
    }
}

/// A binary array (ndim, has-null flag, element OID, ndim × (length, lower bound), then each
/// element as length + bytes), masked element by element; withheld if any element must be.
fn binary_array(plan: &ColumnMasker<'_>, class: Class, v: &[u8], counts: &mut MaskCounts) -> Out {
    let read = || -> Option<(usize, usize)> {
        let ndim = usize::try_from(be_i32(v, 0)?).ok()?;
        let mut n = 1usize;
        for d in 0..ndim {
            n = n.checked_mul(usize::try_from(be_i32(v, 12 + 8 * d)?).ok()?)?;
        }
        Some((12 + 8 * ndim, if ndim == 0 { 0 } else { n }))
    };
    let Some((header, n)) = read() else {
        return Out::Withheld;
    };
    let spliced = splice_values(v, header, n, false, |_, e| {
        binary_value(plan, class, None, e, counts)
    });
    match spliced {
        Some(out) => Out::from(out),
        None => Out::Withheld,
    }
}

/// `n` length-prefixed values (int32 length, -1 for NULL, then the bytes) from `src[pos..]`, as
/// DataRows and binary arrays carry them, each passed through `f` (with its index). A withheld
/// value becomes NULL when `null_withheld`, else ends the walk. `None`: the bytes are not `n`
/// values, or the walk ended; `Some(None)`: nothing changed.
fn splice_values(
    src: &[u8],
    mut pos: usize,
    n: usize,
    null_withheld: bool,
    mut f: impl FnMut(usize, &[u8]) -> Out,
) -> Option<Option<Vec<u8>>> {
    let mut sp = Splicer::new(src);
    for i in 0..n {
        let len = be_i32(src, pos)?;
        let start = pos + 4;
        let end = start + usize::try_from(len).unwrap_or(0);
        if len >= 0 {
            match f(i, src.get(start..end)?) {
                Out::Same => {}
                Out::Changed(b) => sp.replace(
                    pos,
                    end,
                    &[&(b.len() as i32).to_be_bytes()[..], &b].concat(),
                ),
                Out::Withheld if null_withheld => sp.replace(pos, end, &(-1i32).to_be_bytes()),
                Out::Withheld => return None,
            }
        }
        pos = end;
    }
    Some(sp.finish())
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_i16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// One field of a RowDescription, borrowed from the frame.
struct FieldDesc<'b> {
    name: &'b [u8],
    table_oid: u32,
    attnum: i16,
    type_oid: u32,
    /// Offset of the type OID in the frame body (then typlen, typmod, format).
    type_at: usize,
    format: i16,
}

fn row_description(body: &[u8]) -> Result<Vec<FieldDesc<'_>>, MaskWireError> {
    let bad = || MaskWireError::Malformed("RowDescription");
    let n = be_i16(body, 0).ok_or_else(bad)?;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let nul = memchr::memchr(0, body.get(pos..).ok_or_else(bad)?).ok_or_else(bad)?;
        let name = &body[pos..pos + nul];
        let p = pos + nul + 1;
        if body.len() < p + 18 {
            return Err(bad());
        }
        out.push(FieldDesc {
            name,
            table_oid: be_i32(body, p).ok_or_else(bad)? as u32,
            attnum: be_i16(body, p + 4).ok_or_else(bad)?,
            type_oid: be_i32(body, p + 6).ok_or_else(bad)? as u32,
            type_at: p + 6,
            format: be_i16(body, p + 16).ok_or_else(bad)?,
        });
        pos = p + 18;
    }
    Ok(out)
}

/// A COPY row (one CopyData) with each field masked by its column's plan (`fallback` past the
/// known columns); `None` when nothing changed.
fn copy_row(
    plans: &[ColumnMasker<'_>],
    fallback: &ColumnMasker<'_>,
    f: CopyFormat,
    row: &[u8],
    counts: &mut MaskCounts,
) -> Option<Vec<u8>> {
    let body = row.strip_suffix(b"\n").unwrap_or(row);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let mut sp = Splicer::new(row);
    let mut pos = 0;
    for i in 0.. {
        let plan = plans.get(i).unwrap_or(fallback);
        let end = field_end(f, body, pos);
        let raw = &body[pos..end];
        if !is_null(f, raw)
            && let Some(m) = changed(plan.mask(&unescape(f, raw)), counts)
        {
            let mut escaped = Vec::with_capacity(m.len() + 2);
            escape(f, &m, &mut escaped);
            sp.replace(pos, end, &escaped);
        }
        if end >= body.len() {
            break;
        }
        pos = end + 1;
    }
    sp.finish()
}

/// Where the field starting at `pos` ends (the next unquoted, unescaped delimiter, or the end).
fn field_end(f: CopyFormat, b: &[u8], mut pos: usize) -> usize {
    let mut quoted = false;
    while pos < b.len() {
        let c = b[pos];
        if f.csv {
            if quoted && c == f.escape && f.escape != f.quote && pos + 1 < b.len() {
                pos += 2;
                continue;
            }
            if c == f.quote {
                quoted = !quoted;
            } else if c == f.delimiter && !quoted {
                return pos;
            }
        } else if c == b'\\' {
            pos += 2;
            continue;
        } else if c == f.delimiter {
            return pos;
        }
        pos += 1;
    }
    b.len()
}

fn is_null(f: CopyFormat, raw: &[u8]) -> bool {
    if f.csv { raw.is_empty() } else { raw == b"\\N" }
}

/// A field's value: CSV quotes removed, or text format's backslash escapes decoded.
fn unescape(f: CopyFormat, raw: &[u8]) -> Cow<'_, [u8]> {
    let special = if f.csv { f.quote } else { b'\\' };
    if !(raw.contains(&special) || f.csv && raw.contains(&f.escape)) {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let mut quoted = false;
    while i < raw.len() {
        let c = raw[i];
        if f.csv {
            let next = raw.get(i + 1).copied();
            if quoted
                && c == f.escape
                && (next == Some(f.quote) || (next == Some(f.escape) && f.escape != f.quote))
            {
                out.push(next.unwrap_or(c));
                i += 2;
                continue;
            }
            if c == f.quote {
                quoted = !quoted;
            } else {
                out.push(c);
            }
            i += 1;
            continue;
        }
        if c != b'\\' || i + 1 >= raw.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let e = raw[i + 1];
        i += 2;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let mut v = 0;
                let mut n = 0;
                while n < 2
                    && let Some(d) = raw.get(i).copied().and_then(hex)
                {
                    v = v * 16 + d;
                    i += 1;
                    n += 1;
                }
                out.push(if n == 0 { b'x' } else { v as u8 });
            }
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// Append `v` as one field: CSV quoted (quotes escaped), or text format with backslash escapes.
fn escape(f: CopyFormat, v: &[u8], out: &mut Vec<u8>) {
    if f.csv {
        out.push(f.quote);
        for &c in v {
            if c == f.quote || c == f.escape {
                out.push(f.escape);
            }
            out.push(c);
        }
        out.push(f.quote);
        return;
    }
    for &c in v {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c == f.delimiter => out.extend_from_slice(&[b'\\', c]),
            c => out.push(c),
        }
    }
}

/// What the client asked for that shapes the server's answers, in order: the server answers
/// each of these in turn (or skips to the next Sync after an error).
#[derive(Debug)]
enum Pending {
    /// Parse of a statement name: its old description no longer holds.
    Parse(String),
    /// Bind of a statement to a portal, with the result formats asked for.
    Bind {
        portal: String,
        statement: String,
        formats: Vec<i16>,
    },
    /// Describe of a statement: its ParameterDescription, then RowDescription or NoData.
    DescribeStatement(String),
    /// Describe of a portal: its RowDescription or NoData. `injected`: the proxy's own, sent
    /// after every Bind so each portal's columns are known even when the client never asks;
    /// its answer is used here and not passed on.
    DescribePortal { portal: String, injected: bool },
    /// Execute of a portal: its rows, then CommandComplete, PortalSuspended or
    /// EmptyQueryResponse.
    Execute(String),
    /// Sync or Query: answered by ReadyForQuery. A Query's `COPY … TO STDOUT` formats, in order,
    /// and whether it may redefine named statements or portals (SQL PREPARE, DEALLOCATE,
    /// DISCARD, DECLARE, CLOSE): then no description kept from before still holds.
    Sync {
        copies: VecDeque<CopyOut>,
        redefines: bool,
    },
}

/// A client that keeps more requests unanswered than [`MAX_PENDING`]: its session ends rather
/// than have answers paired with the wrong requests.
#[derive(Debug, thiserror::Error)]
#[error("more than {MAX_PENDING} requests pipelined without answers; masking cannot follow them")]
pub struct TooManyPending;

/// Client frames the server-to-client half must know about, noted by the client-to-server half
/// as it forwards them.
#[derive(Debug, Default)]
pub struct Requests {
    queue: Mutex<VecDeque<Pending>>,
}

/// How many requests may wait for answers; a client that pipelines more is cut off.
const MAX_PENDING: usize = 1 << 16;

impl Requests {
    /// Note a frame the client sends on, by tag and body, as sent: a refusal's stand-in (a
    /// Parse or Bind the server will reject) shapes the answers, not the frame it replaced. A
    /// Query is noted with [`Requests::note_query`].
    pub fn note(&self, tag: u8, body: &[u8]) -> Result<(), TooManyPending> {
        debug_assert_ne!(tag, b'Q', "a Query is noted with note_query");
        let p = match tag {
            b'P' => Pending::Parse(cstr(body)),
            b'B' => match bind_formats(body) {
                Some((portal, statement, formats)) => Pending::Bind {
                    portal,
                    statement,
                    formats,
                },
                None => return Ok(()),
            },
            b'D' if body.first() == Some(&b'S') => Pending::DescribeStatement(cstr(&body[1..])),
            b'D' => Pending::DescribePortal {
                portal: cstr(body.get(1..).unwrap_or_default()),
                injected: false,
            },
            b'E' => Pending::Execute(cstr(body)),
            b'S' => Pending::Sync {
                copies: VecDeque::new(),
                redefines: false,
            },
            _ => return Ok(()),
        };
        self.push(p)
    }

    /// Note a simple Query the client sends on, by what its classification says (the string is
    /// not read again): its `COPY … TO STDOUT` statements, and whether it may redefine names
    /// (see `Classified::redefines_names`).
    pub fn note_query(&self, copies: &[CopyOut], redefines: bool) -> Result<(), TooManyPending> {
        self.push(Pending::Sync {
            copies: copies.iter().cloned().collect(),
            redefines,
        })
    }

    /// Note the Describe of `portal` the proxy adds after a Bind.
    pub fn note_injected_describe(&self, portal: &str) -> Result<(), TooManyPending> {
        self.push(Pending::DescribePortal {
            portal: portal.to_string(),
            injected: true,
        })
    }

    fn push(&self, p: Pending) -> Result<(), TooManyPending> {
        let mut q = self.queue.lock().unwrap();
        if q.len() >= MAX_PENDING {
            return Err(TooManyPending);
        }
        q.push_back(p);
        Ok(())
    }

    /// Pop the request at the front if `want` accepts it: for answers that a simple Query's
    /// results also give (RowDescription, rows), which must not consume its marker.
    fn answer_front(&self, want: impl Fn(&Pending) -> bool) -> Option<Pending> {
        let mut q = self.queue.lock().unwrap();
        if q.front().is_some_and(want) {
            return q.pop_front();
        }
        None
    }

    /// Pop answered requests up to the first that `want` accepts, which is returned.
    fn answer(&self, want: impl Fn(&Pending) -> bool) -> Option<Pending> {
        let mut q = self.queue.lock().unwrap();
        while let Some(p) = q.pop_front() {
            if want(&p) {
                return Some(p);
            }
        }
        None
    }

    /// The next COPY format of the Query being answered.
    fn next_copy(&self) -> CopyOut {
        let mut q = self.queue.lock().unwrap();
        match q.front_mut() {
            Some(Pending::Sync { copies, .. }) => copies.pop_front().unwrap_or_default(),
            _ => CopyOut::default(),
        }
    }
}

fn cstr(b: &[u8]) -> String {
    let end = memchr::memchr(0, b).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A Bind's portal name, statement name and result format codes.
fn bind_formats(body: &[u8]) -> Option<(String, String, Vec<i16>)> {
    let portal_end = memchr::memchr(0, body)?;
    let portal = String::from_utf8_lossy(&body[..portal_end]).into_owned();
    let rest = &body[portal_end + 1..];
    let stmt_end = memchr::memchr(0, rest)?;
    let statement = String::from_utf8_lossy(&rest[..stmt_end]).into_owned();
    let mut pos = portal_end + 1 + stmt_end + 1;
    let nfmt = be_i16(body, pos)?.max(0) as usize;
    pos += 2 + 2 * nfmt;
    let nparams = be_i16(body, pos)?.max(0) as usize;
    pos += 2;
    for _ in 0..nparams {
        let len = be_i32(body, pos)?;
        pos += 4 + len.max(0) as usize;
    }
    let nres = be_i16(body, pos)?.max(0) as usize;
    let formats = (0..nres)
        .map(|i| be_i16(body, pos + 2 + 2 * i))
        .collect::<Option<Vec<_>>>()?;
    Some((portal, statement, formats))
}

/// Result format codes: none (all text), one (for all), or one per column.
#[derive(Debug, Clone, Default)]
struct Formats(Vec<i16>);

/// How many portals a session keeps described (they live until the transaction ends).
const MAX_PORTALS: usize = 1024;

impl Formats {
    fn binary(&self, col: usize) -> bool {
        match self.0.as_slice() {
            [] => false,
            [f] => *f == 1,
            fs => fs.get(col) == Some(&1),
        }
    }
}

/// What the rows being sent now belong to.
#[derive(Clone)]
enum Rows<'m> {
    /// No description: detector-only text columns.
    Unknown(Formats),
    Described(Arc<[ColPlan<'m>]>, Formats),
}

/// How many statement descriptions a session keeps (clients that never reuse names).
const MAX_STATEMENTS: usize = 4096;

/// Per session: the columns of the rows in flight, the statements' descriptions, the counts.
pub struct ResultMasker<'m> {
    masker: &'m Masker,
    relations: Arc<Relations>,
    requests: &'m Requests,
    unknown: ColPlan<'m>,
    rows: Rows<'m>,
    statements: HashMap<String, Arc<[ColPlan<'m>]>>,
    /// Open portals' rows: an Execute without Describe (again after PortalSuspended, or a
    /// later Sync in a transaction) reads them.
    portals: HashMap<String, Rows<'m>>,
    /// An Execute's rows are being sent.
    executing: bool,
    /// A statement Describe's RowDescription is next.
    describing: Option<String>,
    copy: Option<Copying<'m>>,
    pub counts: MaskCounts,
}

enum Copying<'m> {
    /// Text or CSV rows: each field with its column's plan (when the table is known), the
    /// header row (column names) left alone.
    Rows {
        format: CopyFormat,
        plans: Vec<ColumnMasker<'m>>,
        header: bool,
    },
    /// Binary COPY output: dropped; the CommandComplete becomes an error.
    Refused,
}

/// What to do with one server frame.
enum Edit {
    Keep,
    Replace(BytesMut),
    Drop,
}

impl<'m> ResultMasker<'m> {
    pub fn new(masker: &'m Masker, relations: Arc<Relations>, requests: &'m Requests) -> Self {
        Self {
            masker,
            relations,
            requests,
            unknown: ColPlan::unknown(masker),
            rows: Rows::Unknown(Formats::default()),
            statements: HashMap::new(),
            portals: HashMap::new(),
            executing: false,
            describing: None,
            copy: None,
            counts: MaskCounts::default(),
        }
    }

    /// Mask a run of whole frames; the same bytes back when nothing changed.
    pub fn rewrite(&mut self, chunk: BytesMut) -> Result<BytesMut, MaskWireError> {
        let mut sp = Splicer::new(&chunk);
        let mut pos = 0;
        while chunk.len() >= pos + 5 {
            let len = be_i32(&chunk, pos + 1).unwrap_or(4).max(4) as usize;
            let end = (pos + 1 + len).min(chunk.len());
            match self.frame(chunk[pos], &chunk[pos + 5..end])? {
                Edit::Keep => {}
                Edit::Replace(f) => sp.replace(pos, end, &f),
                Edit::Drop => sp.replace(pos, end, &[]),
            }
            pos = end;
        }
        // Vec → Bytes → BytesMut takes the allocation over, without a copy.
        Ok(sp
            .finish()
            .map_or(chunk, |v| BytesMut::from(bytes::Bytes::from(v))))
    }

    fn frame(&mut self, tag: u8, body: &[u8]) -> Result<Edit, MaskWireError> {
        Ok(match tag {
            b'D' => {
                if !self.executing {
                    self.executing = true;
                    self.start_execute();
                }
                self.data_row(body)?
            }
            b'C' | b's' | b'I' => {
                if !std::mem::take(&mut self.executing) {
                    self.start_execute();
                }
                self.command_complete(tag)
            }
            b'T' => self.row_description(body)?,
            b'1' => {
                if let Some(Pending::Parse(name)) =
                    self.requests.answer(|p| matches!(p, Pending::Parse(_)))
                {
                    self.statements.remove(&name);
                }
                Edit::Keep
            }
            b'2' => {
                if let Some(Pending::Bind {
                    portal,
                    statement,
                    formats,
                }) = self.requests.answer(|p| matches!(p, Pending::Bind { .. }))
                {
                    let rows = match self.statements.get(&statement) {
                        Some(plans) => Rows::Described(plans.clone(), Formats(formats)),
                        None => Rows::Unknown(Formats(formats)),
                    };
                    self.set_portal(portal, rows);
                }
                Edit::Keep
            }
            b't' => {
                if let Some(Pending::DescribeStatement(name)) = self
                    .requests
                    .answer(|p| matches!(p, Pending::DescribeStatement(_)))
                {
                    self.describing = Some(name);
                }
                Edit::Keep
            }
            b'n' => {
                if self.describing.take().is_none()
                    && let Some(Pending::DescribePortal { injected: true, .. }) = self
                        .requests
                        .answer_front(|p| matches!(p, Pending::DescribePortal { .. }))
                {
                    return Ok(Edit::Drop);
                }
                Edit::Keep
            }
            b'H' => {
                let binary = body.first() == Some(&1);
                let out = self.requests.next_copy();
                if binary || out.foreign_encoding {
                    self.copy = Some(Copying::Refused);
                    return Ok(Edit::Drop);
                }
                let plans = self
                    .relations
                    .copy_columns(&out)
                    .iter()
                    .map(|(name, qualified)| {
                        self.masker.column(&Column {
                            name: Some(name),
                            qualified: Some(&**qualified).filter(|q| !q.is_empty()),
                            ty: ValueType::Text,
                        })
                    })
                    .collect();
                self.copy = Some(Copying::Rows {
                    format: out.format,
                    plans,
                    header: out.header,
                });
                Edit::Keep
            }
            b'd' | b'c' => match &mut self.copy {
                Some(Copying::Refused) => Edit::Drop,
                Some(Copying::Rows { header, .. }) if *header && tag == b'd' => {
                    *header = false;
                    Edit::Keep
                }
                Some(Copying::Rows { format, plans, .. }) if tag == b'd' => {
                    match copy_row(plans, &self.unknown.plan, *format, body, &mut self.counts) {
                        Some(row) => Edit::Replace(frame(b'd', &row)),
                        None => Edit::Keep,
                    }
                }
                _ => Edit::Keep,
            },
            b'E' => {
                self.copy = None;
                self.describing = None;
                self.executing = false;
                self.error_fields(tag, body)
            }
            b'N' => self.error_fields(tag, body),
            b'A' => self.notification(body),
            b'Z' => {
                if let Some(Pending::Sync {
                    redefines: true, ..
                }) = self.requests.answer(|p| matches!(p, Pending::Sync { .. }))
                {
                    // SQL may have given a described name to another statement or portal.
                    self.statements.clear();
                    self.portals.clear();
                }
                self.rows = Rows::Unknown(Formats::default());
                self.describing = None;
                self.copy = None;
                self.executing = false;
                // Idle: the transaction is over, and its portals with it.
                if body.first() == Some(&b'I') {
                    self.portals.clear();
                }
                Edit::Keep
            }
            _ => Edit::Keep,
        })
    }

    /// The first answer to an Execute (a row or its end): its portal's rows are the ones sent.
    fn start_execute(&mut self) {
        if let Some(Pending::Execute(portal)) = self
            .requests
            .answer_front(|p| matches!(p, Pending::Execute(_)))
        {
            self.rows = self
                .portals
                .get(&portal)
                .cloned()
                .unwrap_or(Rows::Unknown(Formats::default()));
        }
    }

    /// Rows `rows` for `portal`, and for what comes next.
    fn set_portal(&mut self, portal: String, rows: Rows<'m>) {
        if self.portals.len() >= MAX_PORTALS {
            self.portals.clear();
        }
        self.portals.insert(portal, rows.clone());
        self.rows = rows;
    }

    /// CommandComplete (the end of a binary COPY refused becomes the refusal), PortalSuspended,
    /// EmptyQueryResponse.
    fn command_complete(&mut self, tag: u8) -> Edit {
        if tag != b'C' {
            return Edit::Keep;
        }
        match self.copy.take() {
            Some(Copying::Refused) => {
                tracing::info!("binary COPY output withheld: it cannot be masked");
                let mut b = BytesMut::new();
                super::error::PgError::unmaskable(
                    "binary COPY output cannot be masked; use text or CSV format",
                )
                .encode(&mut b);
                Edit::Replace(b)
            }
            _ => Edit::Keep,
        }
    }

    fn row_description(&mut self, body: &[u8]) -> Result<Edit, MaskWireError> {
        let fields = row_description(body)?;
        let plans: Arc<[ColPlan<'m>]> = fields
            .iter()
            .map(|f| ColPlan::new(self.masker, &self.relations, f))
            .collect();
        let mut edited: Option<Vec<u8>> = None;
        for (f, p) in fields.iter().zip(plans.iter()) {
            if p.retyped && f.type_oid != TEXT_OID {
                let b = edited.get_or_insert_with(|| body.to_vec());
                // type OID, typlen (-1: variable), typmod (-1: none)
                b[f.type_at..f.type_at + 4].copy_from_slice(&TEXT_OID.to_be_bytes());
                b[f.type_at + 4..f.type_at + 6].copy_from_slice(&(-1i16).to_be_bytes());
                b[f.type_at + 6..f.type_at + 10].copy_from_slice(&(-1i32).to_be_bytes());
            }
        }
        match self.describing.take() {
            Some(name) => {
                if self.statements.len() >= MAX_STATEMENTS {
                    self.statements.clear();
                }
                self.statements.insert(name, plans);
            }
            None => {
                let formats = Formats(fields.iter().map(|f| f.format).collect());
                let rows = Rows::Described(plans, formats);
                match self
                    .requests
                    .answer_front(|p| matches!(p, Pending::DescribePortal { .. }))
                {
                    Some(Pending::DescribePortal { portal, injected }) => {
                        self.set_portal(portal, rows);
                        if injected {
                            return Ok(Edit::Drop);
                        }
                    }
                    _ => self.rows = rows,
                }
            }
        }
        Ok(edited.map_or(Edit::Keep, |b| Edit::Replace(frame(b'T', &b))))
    }

    fn data_row(&mut self, body: &[u8]) -> Result<Edit, MaskWireError> {
        let n = be_i16(body, 0).ok_or(MaskWireError::Malformed("DataRow"))?;
        let (plans, formats) = match &self.rows {
            Rows::Unknown(f) => (None, f),
            Rows::Described(p, f) => (Some(p), f),
        };
        let (unknown, counts) = (&self.unknown, &mut self.counts);
        // Rows of a portal whose columns are unknown (the client described neither it nor its
        // statement in a way the proxy saw): with column rules in force nothing in them can be
        // cleared, so every value is withheld; without, text is scanned.
        let strict = self.masker.has_column_rules();
        let spliced = splice_values(body, 2, n.max(0) as usize, true, |i, v| {
            let binary = formats.binary(i);
            match plans.and_then(|p| p.get(i)) {
                Some(p) => p.value(binary, v, counts),
                // No description: binary cannot be read.
                None if binary || strict => {
                    counts.add(&unknown.plan.withheld(v.len()));
                    Out::Withheld
                }
                None => unknown.value(false, v, counts),
            }
        });
        let out = spliced.ok_or(MaskWireError::Malformed("DataRow"))?;
        Ok(out.map_or(Edit::Keep, |b| Edit::Replace(frame(b'D', &b))))
    }

    /// NotificationResponse (pid, channel, payload): the payload scanned (NOTIFY carries data).
    fn notification(&mut self, body: &[u8]) -> Edit {
        let Some(channel_end) = body.get(4..).and_then(|b| memchr::memchr(0, b)) else {
            return Edit::Keep;
        };
        let start = 4 + channel_end + 1;
        let end = body.len().saturating_sub(1).max(start);
        let mut sp = Splicer::new(body);
        if let Some(m) = changed(self.unknown.plan.mask(&body[start..end]), &mut self.counts) {
            sp.replace(start, end, &without_nul(m));
        }
        sp.finish()
            .map_or(Edit::Keep, |b: Vec<u8>| Edit::Replace(frame(b'A', &b)))
    }

    /// ErrorResponse / NoticeResponse: message, detail, hint, context and internal query
    /// scanned (a PL/pgSQL error can echo the dynamic SQL it built from table data).
    fn error_fields(&mut self, tag: u8, body: &[u8]) -> Edit {
        let mut sp = Splicer::new(body);
        let mut pos = 0;
        while let Some(&code) = body.get(pos).filter(|&&c| c != 0) {
            let Some(nul) = memchr::memchr(0, &body[pos + 1..]) else {
                break;
            };
            let (start, end) = (pos + 1, pos + 1 + nul);
            if matches!(code, b'M' | b'D' | b'H' | b'W' | b'q')
                && let Some(m) =
                    changed(self.unknown.plan.mask(&body[start..end]), &mut self.counts)
            {
                sp.replace(start, end, &without_nul(m));
            }
            pos = end + 1;
        }
        sp.finish()
            .map_or(Edit::Keep, |b: Vec<u8>| Edit::Replace(frame(tag, &b)))
    }
}

/// A NUL would end a C string field early.
fn without_nul(mut v: Vec<u8>) -> Vec<u8> {
    v.retain(|&b| b != 0);
    v
}

/// A frame of `tag` around `body`.
fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{MaskRules, TokenKey};
    use crate::protocols::postgres::classify::classify;

    /// The `COPY … TO STDOUT` statements of `sql`, as its classification reads them.
    fn copy_outs(sql: &str) -> Vec<CopyOut> {
        classify(sql).unwrap().copy_outs
    }

    fn masker(yaml: &str) -> Masker {
        let rules: MaskRules = serde_yaml::from_str(yaml).unwrap();
        Masker::new(&rules, TokenKey::from_bytes([3; 32])).unwrap()
    }

    /// `(name, table oid, attnum, type oid, format)` per column.
    fn row_desc(cols: &[(&str, u32, i16, u32, i16)]) -> BytesMut {
        let mut b = Vec::new();
        b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for (name, table, attnum, ty, format) in cols {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&attnum.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&4i16.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        frame(b'T', &b)
    }

    fn data_row(values: &[Option<&[u8]>]) -> BytesMut {
        let mut b = Vec::new();
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        frame(b'D', &b)
    }

    /// The values of the DataRows in `chunk`.
    fn rows(chunk: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
        frames(chunk)
            .into_iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, body)| {
                let n = be_i16(&body, 0).unwrap();
                let mut pos = 2;
                (0..n)
                    .map(|_| {
                        let len = be_i32(&body, pos).unwrap();
                        pos += 4;
                        (len >= 0).then(|| {
                            pos += len as usize;
                            body[pos - len as usize..pos].to_vec()
                        })
                    })
                    .collect()
            })
            .collect()
    }

    fn frames(chunk: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < chunk.len() {
            let len = be_i32(chunk, pos + 1).unwrap() as usize;
            out.push((chunk[pos], chunk[pos + 5..pos + 1 + len].to_vec()));
            pos += 1 + len;
        }
        out
    }

    fn cat(parts: &[BytesMut]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in parts {
            b.extend_from_slice(p);
        }
        b
    }

    fn relations() -> Arc<Relations> {
        let row = |oid: &str, num: &str, col: &str| {
            ["16384", num, "public", "users", col]
                .iter()
                .map(|s| Some(if *s == "16384" { oid } else { s }.to_string()))
                .collect()
        };
        let ty = |t: &str, a: &str| vec![Some(t.to_string()), Some(a.to_string())];
        Arc::new(Relations::from_rows(
            vec![
                row("16384", "1", "id"),
                row("16384", "2", "email"),
                vec![None],
            ],
            vec![ty("16400", "16399"), vec![None]],
        ))
    }

    #[test]
    fn type_oids_map_to_value_types() {
        let rel = relations();
        let type_of = |oid| type_of(oid, &rel);
        assert_eq!(type_of(23).0, ValueType::Number);
        assert_eq!(type_of(1184).0, ValueType::Timestamp);
        assert_eq!(type_of(3802).1, Class::Jsonb);
        let text_array = (
            ValueType::Array(Box::new(ValueType::Text)),
            Class::Textual,
            Some(Class::Textual),
        );
        assert_eq!(type_of(1009), text_array);
        assert_eq!(
            type_of(1007).0,
            ValueType::Array(Box::new(ValueType::Number))
        );
        assert_eq!(type_of(869), (ValueType::Text, Class::Opaque, None));
        // The target's enum (and its array type) travel as text.
        assert_eq!(type_of(16400), (ValueType::Text, Class::Textual, None));
        assert_eq!(type_of(16399), text_array);
        assert_eq!(type_of(16500).1, Class::Opaque);
    }

    #[test]
    fn clean_results_pass_as_the_same_bytes() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        let chunk = cat(&[
            row_desc(&[("id", 16384, 1, 23, 0), ("email", 16384, 2, 25, 0)]),
            data_row(&[Some(b"1"), Some(b"nobody here")]),
        ]);
        let ptr = chunk.as_ptr();
        let out = rm.rewrite(chunk).unwrap();
        assert_eq!(out.as_ptr(), ptr, "not copied");
        assert_eq!(rm.counts.values, 0);
    }

    #[test]
    fn text_rows_are_masked_and_counted() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        let chunk = cat(&[
            row_desc(&[("e", 16384, 2, 25, 0), ("n", 0, 0, 23, 0)]),
            data_row(&[Some(b"ada@example.com"), Some(b"4111111111111111")]),
            data_row(&[None, Some(b"2")]),
        ]);
        let out = rm.rewrite(chunk).unwrap();
        assert_eq!(
            rows(&out),
            [
                vec![Some(b"****".to_vec()), Some(b"4111111111111111".to_vec())],
                vec![None, Some(b"2".to_vec())]
            ]
        );
        assert_eq!(rm.counts.by_rule.get("builtin:email"), Some(&1));
    }

    #[test]
    fn a_column_rule_on_a_number_retypes_it_as_text_even_under_an_alias() {
        let m = masker("rules: [{name: ids, columns: [\"public.users.id\"]}]");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        let chunk = cat(&[
            row_desc(&[("alias", 16384, 1, 23, 0), ("n", 0, 0, 23, 0)]),
            data_row(&[Some(b"42"), Some(b"7")]),
        ]);
        let out = rm.rewrite(chunk).unwrap();
        let desc = frames(&out).remove(0).1;
        let types: Vec<u32> = row_description(&desc)
            .unwrap()
            .iter()
            .map(|f| f.type_oid)
            .collect();
        assert_eq!(types, [25, 23]);
        assert_eq!(
            rows(&out),
            [vec![Some(b"****".to_vec()), Some(b"7".to_vec())]]
        );
        assert_eq!(rm.counts.by_rule.get("ids"), Some(&1));
    }

    #[test]
    fn binary_values_are_read_where_their_bytes_are_text_and_withheld_where_not() {
        let m = masker("rules: [{columns: [\"public.users.id\"]}]");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        // A text[] {"a@b.io", NULL}: ndim 1, has nulls, element OID 25, 2 elements from 1.
        let mut arr = Vec::new();
        for v in [1i32, 1, 25, 2, 1] {
            arr.extend_from_slice(&v.to_be_bytes());
        }
        arr.extend_from_slice(&6i32.to_be_bytes());
        arr.extend_from_slice(b"a@b.io");
        arr.extend_from_slice(&(-1i32).to_be_bytes());
        let chunk = cat(&[
            row_desc(&[
                ("id", 16384, 1, 23, 1),
                ("t", 0, 0, 25, 1),
                ("j", 0, 0, 3802, 1),
                ("ip", 0, 0, 869, 1),
                ("n", 0, 0, 23, 1),
                ("a", 0, 0, 1009, 1),
            ]),
            data_row(&[
                Some(&7i32.to_be_bytes()),
                Some(b"x a@b.io"),
                Some(b"\x01{\"k\": \"a@b.io\"}"),
                Some(&[2, 32, 0, 4, 10, 0, 0, 1]),
                Some(&9i32.to_be_bytes()),
                Some(&arr),
            ]),
        ]);
        let out = rm.rewrite(chunk).unwrap();
        let mut want_arr = arr[..20].to_vec();
        want_arr.extend_from_slice(&4i32.to_be_bytes());
        want_arr.extend_from_slice(b"****");
        want_arr.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            rows(&out),
            [vec![
                None,
                Some(b"x ****".to_vec()),
                Some(b"\x01{\"k\": \"****\"}".to_vec()),
                None,
                Some(9i32.to_be_bytes().to_vec()),
                Some(want_arr),
            ]]
        );
    }

    #[test]
    fn sql_that_redefines_names_drops_the_descriptions_kept() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        // s1 described as an integer...
        req.note(b'P', b"s1\0SELECT 1::int\0\0\0").unwrap();
        req.note(b'D', b"Ss1\0").unwrap();
        req.note(b'S', b"").unwrap();
        rm.rewrite(cat(&[
            frame(b'1', b""),
            frame(b't', &[0, 0]),
            row_desc(&[("int4", 0, 0, 23, 0)]),
            frame(b'Z', b"I"),
        ]))
        .unwrap();
        // ...then made, by SQL, a statement that returns emails.
        let q = classify("deallocate s1; prepare s1 as select email from users").unwrap();
        req.note_query(&q.copy_outs, q.redefines_names).unwrap();
        rm.rewrite(cat(&[
            frame(b'C', b"DEALLOCATE\0"),
            frame(b'C', b"PREPARE\0"),
            frame(b'Z', b"I"),
        ]))
        .unwrap();
        req.note(b'B', &[0, b's', b'1', 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        req.note(b'E', b"\0\0\0\0\0").unwrap();
        req.note(b'S', b"").unwrap();
        let out = rm
            .rewrite(cat(&[
                frame(b'2', b""),
                data_row(&[Some(b"ada@example.com")]),
                frame(b'C', b"SELECT 1\0"),
                frame(b'Z', b"I"),
            ]))
            .unwrap();
        assert_eq!(rows(&out), [vec![Some(b"****".to_vec())]]);
        let redefines_names = |sql| classify(sql).unwrap().redefines_names;
        assert!(redefines_names("CLOSE p; DECLARE p CURSOR FOR SELECT 1"));
        assert!(redefines_names("DISCARD ALL"));
        assert!(redefines_names("DO $$BEGIN END$$"));
        assert!(!redefines_names("SELECT 'declare' AS x"));
        assert!(!redefines_names("SELECT 1"));
    }

    #[test]
    fn a_portal_the_client_never_describes_is_described_by_the_proxy() {
        // A column rule on users.id; the client Parses, Binds and Executes without Describe.
        let m = masker("{rules: [{name: ids, columns: [public.users.id]}]}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        req.note(b'P', b"\0SELECT id FROM users\0\0\0").unwrap();
        req.note(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        req.note_injected_describe("").unwrap();
        req.note(b'E', b"\0\0\0\0\0").unwrap();
        req.note(b'S', b"").unwrap();
        let out = rm
            .rewrite(cat(&[
                frame(b'1', b""),
                frame(b'2', b""),
                row_desc(&[("id", 16384, 1, 23, 0)]),
                data_row(&[Some(b"42")]),
                frame(b'C', b"SELECT 1\0"),
                frame(b'Z', b"I"),
            ]))
            .unwrap();
        let tags: Vec<u8> = frames(&out).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            tags, b"12DCZ",
            "the proxy's own RowDescription is not passed on"
        );
        assert_eq!(rows(&out), [vec![Some(b"****".to_vec())]]);
        assert!(req.queue.lock().unwrap().is_empty());
        // Had no description arrived at all (a Describe the server skipped after an error),
        // nothing in the rows could be cleared under column rules: all withheld.
        req.note(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        req.note(b'E', b"\0\0\0\0\0").unwrap();
        req.note(b'S', b"").unwrap();
        let out = rm
            .rewrite(cat(&[
                frame(b'2', b""),
                data_row(&[Some(b"42")]),
                frame(b'C', b"SELECT 1\0"),
                frame(b'Z', b"I"),
            ]))
            .unwrap();
        assert_eq!(rows(&out), [vec![None]]);
    }

    #[test]
    fn a_client_that_pipelines_without_end_is_cut_off() {
        let req = Requests::default();
        for _ in 0..MAX_PENDING {
            req.note(b'S', b"").unwrap();
        }
        assert!(req.note(b'S', b"").is_err());
    }

    #[test]
    fn binds_use_their_statements_description_and_formats() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        // Parse s1, Describe s1, Sync; Bind s1 (binary results), Execute, Sync.
        req.note(b'P', b"s1\0SELECT\0\0\0").unwrap();
        req.note(b'D', b"Ss1\0").unwrap();
        req.note(b'S', b"").unwrap();
        let mut bind = b"\0s1\0".to_vec();
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(bind_formats(&bind), Some(("".into(), "s1".into(), vec![1])));
        req.note(b'B', &bind).unwrap();
        req.note(b'S', b"").unwrap();
        let described = cat(&[
            frame(b'1', b""),
            frame(b't', &[0, 0]),
            row_desc(&[("email", 16384, 2, 25, 0), ("id", 16384, 1, 23, 0)]),
            frame(b'Z', b"I"),
        ]);
        rm.rewrite(described).unwrap();
        let executed = cat(&[
            frame(b'2', b""),
            data_row(&[Some(b"ada@example.com"), Some(&1i32.to_be_bytes())]),
            frame(b'Z', b"I"),
        ]);
        let out = rm.rewrite(executed).unwrap();
        assert_eq!(
            rows(&out),
            [vec![
                Some(b"****".to_vec()),
                Some(1i32.to_be_bytes().to_vec())
            ]]
        );
        // Without a description, binary values cannot be read: withheld.
        req.note(
            b'B',
            &bind
                .iter()
                .map(|&b| if b == b'1' { b'2' } else { b })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let out = rm
            .rewrite(cat(&[frame(b'2', b""), data_row(&[Some(b"x")])]))
            .unwrap();
        assert_eq!(rows(&out), [vec![None]]);
        rm.rewrite(frame(b'Z', b"I")).unwrap();

        // A named portal in a transaction, executed again after a Sync, without Describe.
        let mut bind_p1 = b"p1\0s1\0".to_vec();
        bind_p1.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
        req.note(b'B', &bind_p1).unwrap();
        req.note(b'E', b"p1\0\0\0\0\x01").unwrap();
        req.note(b'S', b"").unwrap();
        req.note(b'E', b"p1\0\0\0\0\x01").unwrap();
        req.note(b'S', b"").unwrap();
        let row = || data_row(&[Some(b"ada@example.com"), Some(&1i32.to_be_bytes())]);
        let first = cat(&[frame(b'2', b""), row(), frame(b's', b""), frame(b'Z', b"T")]);
        let again = cat(&[row(), frame(b's', b""), frame(b'Z', b"T")]);
        for chunk in [first, again] {
            let out = rm.rewrite(chunk).unwrap();
            assert_eq!(
                rows(&out),
                [vec![
                    Some(b"****".to_vec()),
                    Some(1i32.to_be_bytes().to_vec())
                ]]
            );
        }
        assert!(req.queue.lock().unwrap().is_empty());
    }

    #[test]
    fn copy_rows_are_masked_field_by_field_in_text_and_csv() {
        let m = masker("{}");
        let plan = m.column(&Column::default());
        let mut counts = MaskCounts::default();
        let text = CopyFormat::default();
        assert_eq!(
            copy_row(
                &[],
                &plan,
                text,
                b"1\tada@example.com\t\\N\tx\\tb@c.io\n",
                &mut counts
            )
            .unwrap(),
            b"1\t****\t\\N\tx\\t****\n"
        );
        assert_eq!(copy_row(&[], &plan, text, b"1\tclean\n", &mut counts), None);
        let csv = copy_outs("COPY (SELECT 1) TO STDOUT WITH (FORMAT csv)")[0].format;
        assert_eq!(csv.delimiter, b',');
        assert_eq!(
            copy_row(
                &[],
                &plan,
                csv,
                b"1,\"a, ada@example.com\",,\"q\"\"\"\n",
                &mut counts
            )
            .unwrap(),
            b"1,\"a, ****\",,\"q\"\"\"\n"
        );
        assert_eq!(counts.values, 3);
        let c = copy_outs(
            "copy s.t (b, a) to stdout csv header delimiter ';' quote '''' escape '\\'; select 1; COPY t FROM STDIN",
        );
        assert_eq!(c.len(), 1);
        let f = c[0].format;
        assert_eq!(
            (f.csv, f.delimiter, f.quote, f.escape),
            (true, b';', b'\'', b'\\')
        );
        assert!(c[0].header);
        assert_eq!(c[0].table, Some((Some("s".into()), "t".into())));
        assert_eq!(c[0].columns, ["b", "a"]);
        assert!(!copy_outs("COPY t TO STDOUT (HEADER false)")[0].header);
        assert!(copy_outs("COPY t TO STDOUT (ENCODING 'SJIS')")[0].foreign_encoding);
        assert!(!copy_outs("COPY t TO STDOUT (ENCODING 'UTF-8')")[0].foreign_encoding);
        assert!(copy_outs("SELECT 1").is_empty());
    }

    #[test]
    fn binary_copy_is_withheld_and_refused() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        let q = classify("COPY users TO STDOUT (FORMAT binary)").unwrap();
        req.note_query(&q.copy_outs, q.redefines_names).unwrap();
        let chunk = cat(&[
            frame(b'H', &[1, 0, 1, 0, 1]),
            frame(b'd', b"PGCOPY\n\xff\r\n\0"),
            frame(b'c', b""),
            frame(b'C', b"COPY 1\0"),
            frame(b'Z', b"I"),
        ]);
        let tags: Vec<u8> = frames(&rm.rewrite(chunk).unwrap())
            .iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(tags, b"EZ");
    }

    #[test]
    fn error_and_notice_fields_are_scanned() {
        let m = masker("{}");
        let req = Requests::default();
        let mut rm = ResultMasker::new(&m, relations(), &req);
        let body =
            b"SERROR\0C23505\0Mduplicate key\0DKey (email)=(ada@example.com) already exists.\0\0";
        let out = rm.rewrite(frame(b'E', body)).unwrap();
        assert_eq!(
            &frames(&out)[0].1,
            b"SERROR\0C23505\0Mduplicate key\0DKey (email)=(****) already exists.\0\0"
        );
        let out = rm
            .rewrite(frame(b'A', b"\0\0\0\x07chan\0new a@b.io\0"))
            .unwrap();
        assert_eq!(&frames(&out)[0].1, b"\0\0\0\x07chan\0new ****\0");
    }
}
