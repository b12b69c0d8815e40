//! Structured values: JSON documents and PostgreSQL array literals, masked leaf by leaf so the
//! output stays valid. Owns walking and re-quoting; what a leaf becomes is `ColumnMasker`'s call.
//! Must not change anything but leaves: keys, structure and whitespace pass through byte for
//! byte.

use super::{ColumnMasker, Finding, ValueType, kind::KindSet, kind::hints_of, rules::Rule};

/// Builds an output from the input and replacements, allocating only on the first one.
pub struct Splicer<'v> {
    src: &'v [u8],
    out: Vec<u8>,
    at: usize,
    changed: bool,
}

impl<'v> Splicer<'v> {
    pub fn new(src: &'v [u8]) -> Splicer<'v> {
        Splicer {
            src,
            out: Vec::new(),
            at: 0,
            changed: false,
        }
    }

    /// Replace `src[s..e]`; calls come in increasing, non-overlapping order.
    pub fn replace(&mut self, s: usize, e: usize, with: &[u8]) {
        if !self.changed {
            self.out.reserve(self.src.len() + 16);
            self.changed = true;
        }
        self.out.extend_from_slice(&self.src[self.at..s]);
        self.out.extend_from_slice(with);
        self.at = e;
    }

    /// The output, or `None` if nothing was replaced.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if !self.changed {
            return None;
        }
        self.out.extend_from_slice(&self.src[self.at..]);
        Some(self.out)
    }
}

/// A container being walked, and the hints its values inherit.
struct Frame {
    object: bool,
    /// Hints of the container's own position (its key, and the keys above it).
    ctx: KindSet,
    /// Objects: hints of the key whose value comes next.
    key: KindSet,
}

fn value_ctx(stack: &[Frame], column: KindSet) -> KindSet {
    match stack.last() {
        None => column,
        Some(f) if f.object => f.ctx.union(f.key),
        Some(f) => f.ctx,
    }
}

/// Mask the string and number leaves of a JSON document. `None`: not JSON (the caller scans it
/// as text). A masked number becomes a JSON string, so the document stays valid.
pub(super) fn json(
    cm: &ColumnMasker<'_>,
    v: &[u8],
    hints: KindSet,
    base: usize,
    out: &mut Vec<Finding>,
) -> Option<Option<Vec<u8>>> {
    // Validate first: the walk below trusts the structure.
    serde_json::from_slice::<serde::de::IgnoredAny>(v).ok()?;
    let mut sp = Splicer::new(v);
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            open @ (b'{' | b'[') => {
                let ctx = value_ctx(&stack, hints);
                stack.push(Frame {
                    object: open == b'{',
                    ctx,
                    key: KindSet::EMPTY,
                });
                expect_key = open == b'{';
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' => {
                expect_key = stack.last().is_some_and(|f| f.object);
                i += 1;
            }
            b':' => {
                expect_key = false;
                i += 1;
            }
            b'"' => {
                let (end, escaped) = string_end(v, i);
                if expect_key {
                    // The key names what follows; it is masked itself only where a detector
                    // finds something (a map keyed by email), in its object's context.
                    if let Some(f) = stack.last_mut() {
                        f.key =
                            std::str::from_utf8(&v[i + 1..end]).map_or(KindSet::EMPTY, hints_of);
                        let ctx = f.ctx;
                        if let Some((s, e, new)) =
                            json_string(cm, None, v, (i, end, escaped), ctx, base, out)
                        {
                            sp.replace(s, e, &new);
                        }
                    }
                } else {
                    let ctx = value_ctx(&stack, hints);
                    if let Some((s, e, new)) =
                        json_string(cm, cm.whole, v, (i, end, escaped), ctx, base, out)
                    {
                        sp.replace(s, e, &new);
                    }
                }
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let s = i;
                while i < v.len() && matches!(v[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let ctx = value_ctx(&stack, hints);
                if cm.scans_bare(ctx)
                    && let Some(new) = cm.leaf(&v[s..i], ctx, base + s, out)
                {
                    sp.replace(s, i, &[b"\"", new.as_slice(), b"\""].concat());
                }
            }
            _ => i += 1,
        }
    }
    Some(sp.finish())
}

/// The index of the closing quote of the string opening at `q`, and whether it has escapes.
fn string_end(v: &[u8], q: usize) -> (usize, bool) {
    let mut j = q + 1;
    let mut escaped = false;
    while j < v.len() {
        match v[j] {
            b'\\' => {
                escaped = true;
                j += 2;
            }
            b'"' => break,
            _ => j += 1,
        }
    }
    (j.min(v.len()), escaped)
}

/// The masked string at `v[q0..=q1]` (quotes included): the span to replace and its new bytes.
fn json_string(
    cm: &ColumnMasker<'_>,
    whole: Option<&Rule>,
    v: &[u8],
    (q0, q1, escaped): (usize, usize, bool),
    ctx: KindSet,
    base: usize,
    out: &mut Vec<Finding>,
) -> Option<(usize, usize, Vec<u8>)> {
    if !escaped {
        // Replacements never contain quotes or backslashes, so they drop in as they are.
        let new = cm.leaf_under(whole, &v[q0 + 1..q1], ctx, base + q0 + 1, out)?;
        return Some((q0 + 1, q1, new));
    }
    let text = serde_json::from_slice::<String>(&v[q0..=q1]).ok()?;
    let new = whole_span(out, base + q0, base + q1 + 1, |o| {
        cm.leaf_under(whole, text.as_bytes(), ctx, 0, o)
    })?;
    let new = serde_json::to_string(&String::from_utf8_lossy(&new)).expect("a string serializes");
    Some((q0, q1 + 1, new.into_bytes()))
}

/// Run `f` on an unescaped copy; its findings then cover `[s, e)` of the input, the escaped
/// form, since offsets inside the copy mean nothing to the caller.
fn whole_span(
    out: &mut Vec<Finding>,
    s: usize,
    e: usize,
    f: impl FnOnce(&mut Vec<Finding>) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let mut inner = Vec::new();
    let new = f(&mut inner)?;
    out.extend(inner.into_iter().map(|x| Finding {
        start: s,
        end: e,
        ..x
    }));
    Some(new)
}

/// An element of an array literal: `v[s..e]`, with its quotes if quoted.
struct Elem {
    s: usize,
    e: usize,
    quoted: bool,
    escaped: bool,
}

/// Mask each element of a PostgreSQL array literal. `None`: not one.
pub(super) fn array(
    cm: &ColumnMasker<'_>,
    v: &[u8],
    inner: &ValueType,
    hints: KindSet,
    base: usize,
    out: &mut Vec<Finding>,
) -> Option<Option<Vec<u8>>> {
    let elems = parse_array(v)?;
    let mut sp = Splicer::new(v);
    for el in elems {
        let (cs, ce) = if el.quoted {
            (el.s + 1, el.e - 1)
        } else {
            (el.s, el.e)
        };
        let new = if el.escaped {
            let text = unescape(&v[cs..ce]);
            whole_span(out, base + el.s, base + el.e, |o| {
                cm.typed(&text, inner, hints, 0, o)
            })
        } else {
            cm.typed(&v[cs..ce], inner, hints, base + cs, out)
        };
        if let Some(new) = new {
            sp.replace(el.s, el.e, &quote_elem(&new));
        }
    }
    Some(sp.finish())
}

fn parse_array(v: &[u8]) -> Option<Vec<Elem>> {
    let mut elems = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    if v.first() != Some(&b'{') {
        return None;
    }
    while i < v.len() {
        match v[i] {
            b'{' => {
                depth += 1;
                i += 1;
            }
            b'}' => {
                depth = depth.checked_sub(1)?;
                i += 1;
                if depth == 0 {
                    return v[i..].iter().all(u8::is_ascii_whitespace).then_some(elems);
                }
            }
            b',' | b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => {
                let (end, escaped) = string_end(v, i);
                if end >= v.len() {
                    return None;
                }
                elems.push(Elem {
                    s: i,
                    e: end + 1,
                    quoted: true,
                    escaped,
                });
                i = end + 1;
            }
            _ => {
                let s = i;
                let mut escaped = false;
                while i < v.len() && !b",{}\"".contains(&v[i]) {
                    if v[i] == b'\\' {
                        escaped = true;
                        i += 1;
                    }
                    i += 1;
                }
                let mut e = i.min(v.len());
                while e > s && v[e - 1].is_ascii_whitespace() {
                    e -= 1;
                }
                if !v[s..e].eq_ignore_ascii_case(b"NULL") {
                    elems.push(Elem {
                        s,
                        e,
                        quoted: false,
                        escaped,
                    });
                }
            }
        }
    }
    None
}

fn unescape(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\\' && i + 1 < v.len() {
            i += 1;
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// An element as the array literal needs it: quoted when empty, `NULL`, or holding
/// delimiters, quotes, backslashes or white space.
fn quote_elem(v: &[u8]) -> Vec<u8> {
    let plain = !v.is_empty()
        && !v.eq_ignore_ascii_case(b"NULL")
        && !v
            .iter()
            .any(|b| b",{}\"\\".contains(b) || b.is_ascii_whitespace());
    if plain {
        return v.to_vec();
    }
    let mut out = Vec::with_capacity(v.len() + 2);
    out.push(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}
