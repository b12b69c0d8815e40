//! SQL → facts, on PostgreSQL's own grammar (pg_query wraps the server's parser, so what we
//! classify is what the server will execute: no parser differential).
//!
//! Every statement of a query string is walked completely: the typed parse tree is serialized
//! to a generic tree and every node is visited, so a function call or a data-modifying CTE hidden
//! in a LIMIT clause, a VALUES list or a window definition is seen like any other. Each statement
//! contributes [`SqlClass`]es, the objects it touches (schema-qualified, with their access), and
//! the functions it calls that are not known-safe built-ins.
//!
//! Conservative by construction: a statement type we do not know is `unknown`; a function we do
//! not know is `exec`; `DO` bodies are parsed as PL/pgSQL and dynamic `EXECUTE` is `unknown`.
//! Unqualified relation names resolve as the default `search_path` would (`pg_catalog` for
//! `pg_*` names, else `public`); changing `search_path` is itself `admin`.
//!
//! From the same parse it also reads what the result masking needs (see `mask`): the row layout
//! of each `COPY … TO STDOUT`, and whether a statement may give a protocol-level name to another
//! statement or portal.
//!
//! This module describes; it decides nothing (see `policy::sql`).

use pg_query::{ParserOptions, protobuf::node::Node};
use serde::Serialize;
use serde_json::{Map, Value};
use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
};

/// What kind of thing a statement (or part of one) does, from least to most dangerous.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SqlClass {
    /// Reads data or metadata.
    Read,
    /// Sets a harmless session parameter (application_name, timeouts, output formats) or manages
    /// prepared statements.
    Session,
    /// BEGIN/COMMIT/ROLLBACK/SAVEPOINT (not read-write toggles).
    Transaction,
    /// Changes data, takes locks, or sends notifications.
    Write,
    /// Changes schema.
    Ddl,
    /// Changes privileges or roles.
    Dcl,
    /// Runs code: non-built-in functions, procedures, DO blocks.
    Exec,
    /// Changes the server or the session's security context: SET ROLE, search_path, read-write
    /// toggles, ALTER SYSTEM, LOAD, extensions, COPY to/from files or programs, LISTEN, DISCARD.
    Admin,
    /// Could not be classified (dynamic SQL, an unknown statement type, an unparsable body).
    Unknown,
}

impl SqlClass {
    pub const ALL: [SqlClass; 9] = [
        Self::Read,
        Self::Session,
        Self::Transaction,
        Self::Write,
        Self::Ddl,
        Self::Dcl,
        Self::Exec,
        Self::Admin,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Session => "session",
            Self::Transaction => "transaction",
            Self::Write => "write",
            Self::Ddl => "ddl",
            Self::Dcl => "dcl",
            Self::Exec => "exec",
            Self::Admin => "admin",
            Self::Unknown => "unknown",
        }
    }
}

/// A relation touched, schema-qualified, with how.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub name: String,
    pub access: SqlClass,
}

/// What a query string does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub classes: BTreeSet<SqlClass>,
    pub objects: BTreeSet<ObjectRef>,
    /// Functions called that are not known-safe built-ins. A grant must list each one (or allow
    /// the `exec` class, which covers any function); for messages and deny rules they count as
    /// `exec`.
    pub functions: BTreeSet<String>,
    /// Field names (`a.f`, `(x).f`) that PostgreSQL would call as `f(x)` if no column `f`
    /// exists. The built-ins among them are already in `functions`; the session checks the rest
    /// against the target's own functions (extensions, applications), which only it knows.
    #[serde(skip)]
    pub attribute_names: BTreeSet<String>,
    /// Why something is `unknown` or `admin`, for the error message and the record.
    pub notes: Vec<String>,
}

impl Facts {
    pub fn merge(&mut self, other: &Facts) {
        self.classes.extend(other.classes.iter().copied());
        self.objects.extend(other.objects.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.attribute_names
            .extend(other.attribute_names.iter().cloned());
        self.notes.extend(other.notes.iter().cloned());
    }

    /// The classes, with `exec` added when non-built-in functions are called.
    pub fn effective_classes(&self) -> BTreeSet<SqlClass> {
        let mut c = self.classes.clone();
        if !self.functions.is_empty() {
            c.insert(SqlClass::Exec);
        }
        c
    }

    /// The most dangerous class, for messages.
    pub fn worst(&self) -> Option<SqlClass> {
        self.effective_classes().into_iter().next_back()
    }

    fn class(&mut self, c: SqlClass, note: impl FnOnce() -> String) {
        if matches!(c, SqlClass::Admin | SqlClass::Unknown) {
            self.notes.push(note());
        }
        self.classes.insert(c);
    }
}

/// A query string's facts plus what it does to the session's prepared statements.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Classified {
    pub facts: Facts,
    /// `PREPARE name AS …`: the facts of the prepared statement, judged at `EXECUTE`.
    pub prepares: Vec<(String, Facts)>,
    /// `EXECUTE name`: the session merges the prepared statement's facts.
    pub executes: Vec<String>,
    /// `DEALLOCATE name` (None: ALL).
    pub deallocates: Vec<Option<String>>,
    /// The classification read the contents of a string constant (a `DO` body, a function
    /// body): a statement with the same shape but other constants may differ, so it must not be
    /// cached by normalized text.
    #[serde(skip)]
    pub depends_on_constants: bool,
    /// A top-level PREPARE, DEALLOCATE, DISCARD, DECLARE, CLOSE or DO: the string may give a
    /// name a protocol client uses to another prepared statement or portal, so descriptions kept
    /// from before no longer hold. Only statement types decide, so every text of a shape agrees.
    #[serde(skip)]
    pub redefines_names: bool,
    /// The `COPY … TO STDOUT` statements, in order: how the rows the client gets are laid out.
    /// Read from option values, but a COPY is never shared by shape (`depends_on_constants`).
    #[serde(skip)]
    pub copy_outs: Vec<CopyOut>,
}

impl Classified {
    /// The facts to judge: this string's own, plus what each `EXECUTE` runs, resolved against
    /// statements prepared earlier in the string or, before that, in the session. An `EXECUTE`
    /// of something never prepared is `unknown`.
    pub fn facts_with(&self, session: &HashMap<String, Facts>) -> Cow<'_, Facts> {
        if self.executes.is_empty() {
            return Cow::Borrowed(&self.facts);
        }
        let mut f = self.facts.clone();
        for name in &self.executes {
            let in_string = self
                .prepares
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, f)| f);
            match in_string.or_else(|| session.get(name)) {
                Some(p) => f.merge(p),
                None => {
                    f.classes.insert(SqlClass::Unknown);
                    f.notes.push(format!(
                        "EXECUTE of `{name}`, which this session did not PREPARE"
                    ));
                }
            }
        }
        Cow::Owned(f)
    }

    /// Apply this string's PREPAREs and DEALLOCATEs to the session's prepared statements (once
    /// the string is allowed).
    pub fn apply_to(&self, session: &mut HashMap<String, Facts>) {
        for (name, f) in &self.prepares {
            session.insert(name.clone(), f.clone());
        }
        for d in &self.deallocates {
            match d {
                Some(name) => {
                    session.remove(name);
                }
                None => session.clear(),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("statement does not parse: {0}")]
    Parse(String),
}

/// Classify one query string (possibly several statements).
pub fn classify(sql: &str) -> Result<Classified, ClassifyError> {
    classify_with(sql, ParserOptions::DEFAULT)
}

fn classify_with(sql: &str, opts: ParserOptions) -> Result<Classified, ClassifyError> {
    let parsed = pg_query::parse(sql, opts).map_err(|e| ClassifyError::Parse(e.to_string()))?;
    let mut w = Walker {
        stdio_tokens: stdio_tokens(sql),
        ..Walker::default()
    };
    for raw in &parsed.protobuf.stmts {
        // What the result masking needs, read here so that the string is parsed once.
        let stmt = raw.stmt.as_ref().and_then(|s| s.node.as_ref());
        w.out.redefines_names |= redefines_names(stmt);
        if let Some(Node::CopyStmt(c)) = stmt
            && let Some(out) = CopyOut::of(c)
        {
            w.out.copy_outs.push(out);
        }
        let start = raw.stmt_location.max(0) as usize;
        let end = if raw.stmt_len > 0 {
            start + raw.stmt_len as usize
        } else {
            sql.len()
        };
        w.stmt_range = (start, end);
        // The typed tree serializes losslessly; walking it generically visits every node.
        let tree = serde_json::to_value(raw).map_err(|e| ClassifyError::Parse(e.to_string()))?;
        w.value(&tree, Ctx::top());
    }
    Ok(w.out)
}

/// COPY options that shape a row: text (`\`-escaped, tab-separated) or CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyFormat {
    pub csv: bool,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: u8,
}

impl Default for CopyFormat {
    fn default() -> Self {
        Self {
            csv: false,
            delimiter: b'\t',
            quote: b'"',
            escape: b'"',
        }
    }
}

/// A `COPY … TO STDOUT`: its row format, and the table and columns it copies (none for
/// `COPY (query)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyOut {
    pub format: CopyFormat,
    /// The first row holds column names (`HEADER`).
    pub header: bool,
    /// Schema (`None`: unqualified) and table.
    pub table: Option<(Option<String>, String)>,
    /// `COPY t (a, b)`: the columns named.
    pub columns: Vec<String>,
    /// An `ENCODING` other than UTF-8: the bytes could not be split into fields reliably (in
    /// SJIS a backslash can be a multibyte character's second byte), so the rows are refused
    /// like binary COPY.
    pub foreign_encoding: bool,
}

impl CopyOut {
    /// What a COPY statement sends the client, when it is a `COPY … TO STDOUT` (`None` for COPY
    /// FROM and COPY to a file or program).
    fn of(c: &pg_query::protobuf::CopyStmt) -> Option<CopyOut> {
        if c.is_from || c.is_program || !c.filename.is_empty() {
            return None;
        }
        let string = |n: &Option<Box<pg_query::protobuf::Node>>| match n
            .as_deref()
            .and_then(|n| n.node.as_ref())
        {
            Some(Node::String(s)) => Some(s.sval.clone()),
            _ => None,
        };
        let mut f = CopyFormat::default();
        let mut header = false;
        let mut escape = None;
        let mut foreign_encoding = false;
        for o in &c.options {
            let Some(Node::DefElem(d)) = &o.node else {
                continue;
            };
            let first = || string(&d.arg).and_then(|s| s.bytes().next());
            match d.defname.as_str() {
                "format" => f.csv = string(&d.arg).is_some_and(|s| s.eq_ignore_ascii_case("csv")),
                "delimiter" => f.delimiter = first().unwrap_or(f.delimiter),
                "quote" => f.quote = first().unwrap_or(f.quote),
                "escape" => escape = first(),
                "encoding" => {
                    foreign_encoding = !string(&d.arg).is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().replace(['-', '_'], "").as_str(),
                            "utf8" | "unicode"
                        )
                    })
                }
                // `HEADER` alone, or true/on/1/match.
                "header" => {
                    header = string(&d.arg).is_none_or(|v| {
                        !matches!(v.to_ascii_lowercase().as_str(), "false" | "off" | "0")
                    }) && !matches!(
                        d.arg.as_deref().and_then(|n| n.node.as_ref()),
                        Some(Node::Boolean(b)) if !b.boolval
                    ) && !matches!(
                        d.arg.as_deref().and_then(|n| n.node.as_ref()),
                        Some(Node::Integer(i)) if i.ival == 0
                    )
                }
                _ => {}
            }
        }
        if f.csv
            && f.delimiter == b'\t'
            && !c
                .options
                .iter()
                .any(|o| matches!(&o.node, Some(Node::DefElem(d)) if d.defname == "delimiter"))
        {
            f.delimiter = b',';
        }
        // CSV's escape defaults to its quote.
        f.escape = escape.unwrap_or(f.quote);
        let table = c.relation.as_ref().map(|r| {
            let schema = (!r.schemaname.is_empty()).then(|| r.schemaname.clone());
            (schema, r.relname.clone())
        });
        let columns = c
            .attlist
            .iter()
            .filter_map(|n| match &n.node {
                Some(Node::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect();
        Some(CopyOut {
            format: f,
            header,
            table,
            columns,
            foreign_encoding,
        })
    }
}

/// Whether a top-level statement may give a name a protocol client uses to another prepared
/// statement or portal: PREPARE, DEALLOCATE, DISCARD, DECLARE, CLOSE, or code that could run
/// them (DO).
fn redefines_names(stmt: Option<&Node>) -> bool {
    matches!(
        stmt,
        Some(
            Node::PrepareStmt(_)
                | Node::DeallocateStmt(_)
                | Node::DiscardStmt(_)
                | Node::DeclareCursorStmt(_)
                | Node::ClosePortalStmt(_)
                | Node::DoStmt(_)
        )
    )
}

/// Offsets of the STDIN/STDOUT keywords, by PostgreSQL's own scanner: the parse tree gives
/// `COPY t TO STDOUT` and `COPY t TO ''` (a server file) the same empty filename.
fn stdio_tokens(sql: &str) -> Vec<usize> {
    use pg_query::protobuf::Token;
    let (stdin, stdout, to, from) = (
        Token::Stdin as i32,
        Token::Stdout as i32,
        Token::To as i32,
        Token::From as i32,
    );
    if !sql.to_ascii_lowercase().contains("copy") {
        return Vec::new();
    }
    // Only as the copy's source or destination (right after TO/FROM), not as an option value
    // such as `NULL stdout`.
    pg_query::scan(sql)
        .map(|r| {
            r.tokens
                .windows(2)
                .filter(|w| {
                    (w[0].token == to || w[0].token == from)
                        && (w[1].token == stdin || w[1].token == stdout)
                })
                .map(|w| w[1].start.max(0) as usize)
                .collect()
        })
        .unwrap_or_default()
}

/// Where in the tree the walker is.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    /// Access given to relations met here.
    access: SqlClass,
    /// `EXPLAIN` without `ANALYZE`: statements are planned, not run.
    explain_only: bool,
    /// CTE names in scope (unqualified references to them are not relations).
    ctes: &'a CteScope<'a>,
}

struct CteScope<'a> {
    names: Vec<String>,
    parent: Option<&'a CteScope<'a>>,
}

static NO_CTES: CteScope<'static> = CteScope {
    names: Vec::new(),
    parent: None,
};

impl CteScope<'_> {
    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name) || self.parent.is_some_and(|p| p.contains(name))
    }
}

impl<'a> Ctx<'a> {
    fn top() -> Self {
        Ctx {
            access: SqlClass::Read,
            explain_only: false,
            ctes: &NO_CTES,
        }
    }
    fn with_access(self, access: SqlClass) -> Self {
        Ctx { access, ..self }
    }
}

#[derive(Default)]
struct Walker {
    out: Classified,
    /// Byte range of the statement being walked, in the query string.
    stmt_range: (usize, usize),
    stdio_tokens: Vec<usize>,
}

impl Walker {
    fn value(&mut self, v: &Value, ctx: Ctx<'_>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.value(i, ctx)),
            Value::Object(obj) => self.object(obj, ctx),
            _ => {}
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        if obj.contains_key("relname") && obj.contains_key("relpersistence") {
            return self.range_var(obj, ctx);
        }
        for (key, child) in obj {
            // Node variants are PascalCase keys; fields are snake_case.
            if key.starts_with(|c: char| c.is_ascii_uppercase()) {
                self.node(key, child, ctx);
            } else {
                self.value(child, ctx);
            }
        }
    }

    fn node(&mut self, kind: &str, body: &Value, ctx: Ctx<'_>) {
        let Some(obj) = body.as_object() else {
            return;
        };
        match kind {
            "FuncCall" => self.func_call(obj, ctx),
            "ColumnRef" => self.column_ref(obj, ctx),
            "AIndirection" => self.indirection(obj, ctx),
            // SQL/JSON and MERGE syntax the PG 18 grammar parses as special nodes; on servers
            // that predate them they are ordinary calls, found on the search path.
            "JsonParseExpr"
            | "JsonScalarExpr"
            | "JsonSerializeExpr"
            | "JsonFuncExpr"
            | "JsonObjectConstructor"
            | "JsonArrayConstructor"
            | "JsonArrayQueryConstructor"
            | "JsonObjectAgg"
            | "JsonArrayAgg"
            | "JsonTable"
            | "MergeSupportFunc" => {
                self.out
                    .facts
                    .functions
                    .insert(format!("sql/json or merge syntax ({kind})"));
                self.object(obj, ctx)
            }
            "RangeTableSample" => self.table_sample(obj, ctx),
            "SelectStmt" => self.select(obj, ctx),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => self.dml(obj, ctx),
            k if k.ends_with("Stmt") => self.utility(k, obj, ctx),
            // Everything else (expressions, clauses, lists) is walked for what it contains.
            _ => self.object(obj, ctx),
        }
    }

    fn stmt_class(&mut self, c: SqlClass, ctx: Ctx<'_>, note: impl FnOnce() -> String) {
        // Under plain EXPLAIN nothing runs: the statement is a read of its plan. Function calls
        // still count (the planner may evaluate them).
        let c = if ctx.explain_only && c != SqlClass::Unknown {
            SqlClass::Read
        } else {
            c
        };
        self.out.facts.class(c, note);
    }

    /// Walk a statement's WITH clause with PostgreSQL's scoping, then the rest of the statement
    /// (`f`, which must skip `with_clause`) with every CTE name in scope. Without RECURSIVE a
    /// CTE's body sees only the CTEs before it, so `WITH t AS (SELECT * FROM t)` reads the real
    /// table `t`.
    fn with_ctes(
        &mut self,
        obj: &Map<String, Value>,
        ctx: Ctx<'_>,
        f: impl FnOnce(&mut Self, Ctx<'_>),
    ) {
        let with = obj.get("with_clause").filter(|w| !w.is_null());
        let recursive = with
            .and_then(|w| w.get("recursive"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ctes: Vec<&Value> = with
            .and_then(|w| w.get("ctes"))
            .and_then(Value::as_array)
            .map(|c| c.iter().collect())
            .unwrap_or_default();
        let names: Vec<String> = ctes
            .iter()
            .filter_map(|c| {
                c.pointer("/node/CommonTableExpr/ctename")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        for (i, cte) in ctes.iter().enumerate() {
            let visible = if recursive {
                names.clone()
            } else {
                names[..i.min(names.len())].to_vec()
            };
            let scope = CteScope {
                names: visible,
                parent: Some(ctx.ctes),
            };
            self.value(
                cte,
                Ctx {
                    ctes: &scope,
                    ..ctx
                },
            );
        }
        let scope = CteScope {
            names,
            parent: Some(ctx.ctes),
        };
        f(
            self,
            Ctx {
                ctes: &scope,
                ..ctx
            },
        )
    }

    fn select(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        self.stmt_class(SqlClass::Read, ctx, String::new);
        if obj
            .get("locking_clause")
            .and_then(Value::as_array)
            .is_some_and(|l| !l.is_empty())
        {
            self.stmt_class(SqlClass::Write, ctx, String::new); // FOR UPDATE/SHARE takes row locks
        }
        let into = obj.get("into_clause").filter(|v| !v.is_null());
        if into.is_some() {
            self.stmt_class(SqlClass::Ddl, ctx, String::new); // SELECT INTO creates a table
        }
        self.with_ctes(obj, ctx.with_access(SqlClass::Read), |w, ctx| {
            for (field, child) in obj.iter().filter(|(f, _)| *f != "with_clause") {
                let access = if field == "into_clause" {
                    SqlClass::Ddl
                } else {
                    SqlClass::Read
                };
                w.value(child, ctx.with_access(access));
            }
        });
    }

    fn dml(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        self.stmt_class(SqlClass::Write, ctx, String::new);
        self.with_ctes(obj, ctx, |w, ctx| {
            for (field, child) in obj.iter().filter(|(f, _)| *f != "with_clause") {
                if field == "relation" {
                    // The target of INSERT/UPDATE/DELETE/MERGE is always a real table, whatever
                    // CTE shares its name.
                    w.value(
                        child,
                        Ctx {
                            ctes: &NO_CTES,
                            ..ctx.with_access(SqlClass::Write)
                        },
                    );
                } else {
                    w.value(child, ctx.with_access(SqlClass::Read));
                }
            }
        });
    }

    fn utility(&mut self, kind: &str, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        let class = match kind {
            "RawStmt" => return self.object(obj, ctx),
            "VariableShowStmt" | "FetchStmt" | "ClosePortalStmt" | "DeclareCursorStmt" => {
                SqlClass::Read
            }
            "VariableSetStmt" => {
                // SET TRANSACTION / SESSION CHARACTERISTICS read their option values.
                self.out.depends_on_constants |= obj
                    .get("args")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                variable_set_class(obj)
            }
            "TransactionStmt" => {
                self.out.depends_on_constants |= obj
                    .get("options")
                    .and_then(Value::as_array)
                    .is_some_and(|o| !o.is_empty());
                transaction_class(obj)
            }
            "ConstraintsSetStmt" => SqlClass::Transaction,
            "TruncateStmt" | "LockStmt" | "NotifyStmt" | "RefreshMatViewStmt" => SqlClass::Write,
            "CopyStmt" => return self.copy(obj, ctx),
            "ExplainStmt" => return self.explain(obj, ctx),
            "PrepareStmt" => return self.prepare(obj, ctx),
            "ExecuteStmt" => {
                if let Some(name) = obj.get("name").and_then(Value::as_str) {
                    self.out.executes.push(name.to_owned());
                }
                SqlClass::Session
            }
            "DeallocateStmt" => {
                let all = obj.get("isall").and_then(Value::as_bool).unwrap_or(false);
                let name = obj
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty() && !all);
                self.out.deallocates.push(name.map(str::to_owned));
                SqlClass::Session
            }
            "DoStmt" => return self.do_block(obj, ctx),
            "CallStmt" => SqlClass::Exec,
            "GrantStmt"
            | "GrantRoleStmt"
            | "AlterDefaultPrivilegesStmt"
            | "CreateRoleStmt"
            | "AlterRoleStmt"
            | "AlterRoleSetStmt"
            | "DropRoleStmt"
            | "ReassignOwnedStmt"
            | "DropOwnedStmt"
            | "AlterOwnerStmt"
            | "CreatePolicyStmt"
            | "AlterPolicyStmt" => SqlClass::Dcl,
            "AlterSystemStmt"
            | "LoadStmt"
            | "CreateExtensionStmt"
            | "AlterExtensionStmt"
            | "AlterExtensionContentsStmt"
            | "VacuumStmt"
            | "ClusterStmt"
            | "ReindexStmt"
            | "CheckPointStmt"
            | "CreatedbStmt"
            | "DropdbStmt"
            | "AlterDatabaseStmt"
            | "AlterDatabaseSetStmt"
            | "AlterDatabaseRefreshCollStmt"
            | "CreateTableSpaceStmt"
            | "DropTableSpaceStmt"
            | "AlterTableSpaceOptionsStmt"
            | "AlterTableMoveAllStmt"
            | "CreateSubscriptionStmt"
            | "AlterSubscriptionStmt"
            | "DropSubscriptionStmt"
            | "CreatePublicationStmt"
            | "AlterPublicationStmt"
            | "CreateEventTrigStmt"
            | "AlterEventTrigStmt"
            | "CreateFdwStmt"
            | "AlterFdwStmt"
            | "CreateForeignServerStmt"
            | "AlterForeignServerStmt"
            | "CreateUserMappingStmt"
            | "AlterUserMappingStmt"
            | "DropUserMappingStmt"
            | "ImportForeignSchemaStmt"
            | "CreatePlangStmt"
            | "CreateTransformStmt"
            | "SecLabelStmt"
            | "DiscardStmt"
            | "ListenStmt"
            | "UnlistenStmt"
            | "AlterCollationStmt"
            | "CreateAmStmt" => SqlClass::Admin,
            "CreateStmt"
            | "AlterTableStmt"
            | "DropStmt"
            | "CommentStmt"
            | "RenameStmt"
            | "IndexStmt"
            | "ViewStmt"
            | "RuleStmt"
            | "DefineStmt"
            | "CreateTableAsStmt"
            | "CreateSeqStmt"
            | "AlterSeqStmt"
            | "CreateDomainStmt"
            | "AlterDomainStmt"
            | "CreateFunctionStmt"
            | "AlterFunctionStmt"
            | "CreateTrigStmt"
            | "CreateSchemaStmt"
            | "CreateConversionStmt"
            | "CreateCastStmt"
            | "CreateOpClassStmt"
            | "CreateOpFamilyStmt"
            | "AlterOpFamilyStmt"
            | "CreateEnumStmt"
            | "CreateRangeStmt"
            | "AlterEnumStmt"
            | "CompositeTypeStmt"
            | "CreateStatsStmt"
            | "AlterStatsStmt"
            | "AlterObjectSchemaStmt"
            | "AlterObjectDependsStmt"
            | "AlterTsdictionaryStmt"
            | "AlterTsconfigurationStmt"
            | "AlterOperatorStmt"
            | "AlterTypeStmt"
            | "CreateForeignTableStmt"
            | "AlterTableCmd" => SqlClass::Ddl,
            other => {
                self.out.facts.class(SqlClass::Unknown, || {
                    format!("statement type {other} is not classified")
                });
                return self.object(obj, ctx);
            }
        };
        let note = || match class {
            SqlClass::Admin => format!("{} changes server or session state", describe(kind, obj)),
            _ => String::new(),
        };
        self.stmt_class(class, ctx, note);
        if kind == "DropStmt" {
            self.dropped_objects(obj);
        }
        if kind == "CreateFunctionStmt" {
            // The body is a string constant: same shape, other body, other meaning.
            self.out.depends_on_constants = true;
        }
        // Relations named directly by the statement get its class; queries inside are reads.
        let access = match class {
            SqlClass::Read | SqlClass::Session | SqlClass::Transaction => SqlClass::Read,
            c => c,
        };
        self.object(obj, ctx.with_access(access));
    }

    fn copy(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        // Whether it copies a file depends on a literal (the file name).
        self.out.depends_on_constants = true;
        let is_from = obj.get("is_from").and_then(Value::as_bool).unwrap_or(false);
        let program = obj
            .get("is_program")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (start, end) = self.stmt_range;
        let stdio = self.stdio_tokens.iter().any(|&t| (start..end).contains(&t));
        // `TO ''` parses like `TO STDOUT`: only the STDIN/STDOUT keyword proves a client copy.
        let file = !stdio
            || obj
                .get("filename")
                .and_then(Value::as_str)
                .is_some_and(|f| !f.is_empty());
        if program || file {
            let what = if program {
                "a program"
            } else {
                "a server file"
            };
            self.stmt_class(SqlClass::Admin, ctx, || {
                format!("COPY {} {what}", if is_from { "from" } else { "to" })
            });
        }
        let class = if is_from {
            SqlClass::Write
        } else {
            SqlClass::Read
        };
        self.stmt_class(class, ctx, String::new);
        for (field, child) in obj {
            let access = if field == "relation" {
                class
            } else {
                SqlClass::Read
            };
            self.value(child, ctx.with_access(access));
        }
    }

    fn explain(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        // `ANALYZE 'off'` vs `'on'`: the option's value is a literal.
        self.out.depends_on_constants |= obj
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| !o.is_empty());
        let analyze = obj
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|opts| {
                opts.iter().any(|o| {
                    o.pointer("/node/DefElem/defname").and_then(Value::as_str) == Some("analyze")
                        && !def_elem_is_false(o.pointer("/node/DefElem/arg"))
                })
            });
        self.stmt_class(SqlClass::Read, ctx, String::new);
        let inner = Ctx {
            explain_only: ctx.explain_only || !analyze,
            ..ctx
        };
        self.object(obj, inner);
    }

    /// PREPARE is judged as what it prepares (a statement one may not run, one may not prepare
    /// either), and the prepared facts are kept for EXECUTE.
    fn prepare(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        self.stmt_class(SqlClass::Session, ctx, String::new);
        let mut inner = Walker::default();
        if let Some(q) = obj.get("query") {
            inner.value(q, Ctx::top());
        }
        self.out.depends_on_constants |= inner.out.depends_on_constants;
        self.out.facts.merge(&inner.out.facts);
        if let Some(name) = obj.get("name").and_then(Value::as_str) {
            self.out.prepares.push((name.to_owned(), inner.out.facts));
        }
    }

    fn do_block(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        self.out.depends_on_constants = true;
        self.stmt_class(SqlClass::Exec, ctx, String::new);
        let mut body = None;
        let mut language = "plpgsql".to_string();
        for arg in obj
            .get("args")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = arg.pointer("/node/DefElem/defname").and_then(Value::as_str);
            let val = arg
                .pointer("/node/DefElem/arg/node/String/sval")
                .and_then(Value::as_str);
            match (name, val) {
                (Some("as"), Some(v)) => body = Some(v.to_owned()),
                (Some("language"), Some(v)) => language = v.to_ascii_lowercase(),
                _ => {}
            }
        }
        if language != "plpgsql" {
            return self.out.facts.class(SqlClass::Unknown, || {
                format!("DO block in language {language}")
            });
        }
        let Some(body) = body else {
            return self
                .out
                .facts
                .class(SqlClass::Unknown, || "DO block without a body".into());
        };
        self.plpgsql_body(&body, ctx);
    }

    /// Parse a PL/pgSQL body and classify every SQL statement and expression in it.
    fn plpgsql_body(&mut self, body: &str, ctx: Ctx<'_>) {
        let mut tag = String::from("$chaperone$");
        let mut n = 0;
        while body.contains(&tag) {
            n += 1;
            tag = format!("$chaperone{n}$");
        }
        let wrapper = format!(
            "CREATE FUNCTION chaperone_do() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
        );
        match pg_query::parse_plpgsql(&wrapper) {
            Ok(tree) => self.plpgsql_tree(&tree, ctx),
            Err(e) => self.out.facts.class(SqlClass::Unknown, || {
                format!("PL/pgSQL body does not parse: {e}")
            }),
        }
    }

    fn plpgsql_tree(&mut self, v: &Value, ctx: Ctx<'_>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.plpgsql_tree(i, ctx)),
            Value::Object(obj) => {
                for (key, child) in obj {
                    match key.as_str() {
                        "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors" => {
                            self.out.facts.class(SqlClass::Unknown, || {
                                "dynamic SQL (EXECUTE) in a PL/pgSQL block".into()
                            });
                        }
                        "dynquery" => {
                            self.out.facts.class(SqlClass::Unknown, || {
                                "dynamic cursor query in a PL/pgSQL block".into()
                            });
                        }
                        "PLpgSQL_expr" => self.plpgsql_expr(child, ctx),
                        _ => self.plpgsql_tree(child, ctx),
                    }
                }
            }
            _ => {}
        }
    }

    fn plpgsql_expr(&mut self, expr: &Value, ctx: Ctx<'_>) {
        let Some(query) = expr.get("query").and_then(Value::as_str) else {
            return;
        };
        let mode = expr.get("parseMode").and_then(Value::as_i64).unwrap_or(0) as i32;
        match classify_with(query, ParserOptions::from(mode)) {
            Ok(inner) => {
                let mut facts = inner.facts;
                if ctx.explain_only {
                    facts.classes = facts
                        .classes
                        .into_iter()
                        .map(|c| {
                            if c == SqlClass::Unknown {
                                c
                            } else {
                                SqlClass::Read
                            }
                        })
                        .collect();
                }
                self.out.facts.merge(&facts);
                if !inner.executes.is_empty() || !inner.prepares.is_empty() {
                    self.out.facts.class(SqlClass::Unknown, || {
                        "PREPARE/EXECUTE inside a PL/pgSQL block".into()
                    });
                }
            }
            Err(e) => self.out.facts.class(SqlClass::Unknown, || {
                format!("PL/pgSQL expression `{query}`: {e}")
            }),
        }
    }

    /// `a.b` (and `a.b.c`): PostgreSQL reads `x.f` as `f(x)` when `f` is not a column of `x`
    /// (attribute notation), so a field name may be a call. Without the catalog, names of
    /// built-in functions that have side effects or run SQL count as calls; columns that share
    /// such a name are refused with them, the safe side.
    fn column_ref(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        let names: Vec<&str> = obj
            .get("fields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| f.pointer("/node/String/sval")?.as_str())
            .collect();
        if names.len() >= 2 {
            self.attribute_call(names[names.len() - 1]);
        }
        self.object(obj, ctx);
    }

    /// `(expr).f`, `(expr)[i].f`: every field name may be a call (see [`Self::column_ref`]).
    fn indirection(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        for i in obj
            .get("indirection")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = i.pointer("/node/String/sval").and_then(Value::as_str) {
                self.attribute_call(name);
            }
        }
        self.object(obj, ctx);
    }

    fn attribute_call(&mut self, name: &str) {
        if SAFE_FUNCTIONS.binary_search(&name).is_ok() {
            return;
        }
        if ATTRIBUTE_CALL_FUNCTIONS.binary_search(&name).is_ok() {
            self.out.facts.functions.insert(name.to_owned());
        } else {
            self.out.facts.attribute_names.insert(name.to_owned());
        }
    }

    /// `TABLESAMPLE method(…)`: SYSTEM and BERNOULLI are built in; any other method is an
    /// extension's handler function, judged like a function call.
    fn table_sample(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        let method: Vec<&str> = obj
            .get("method")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.pointer("/node/String/sval")?.as_str())
            .collect();
        if !matches!(method.as_slice(), ["system"] | ["bernoulli"]) {
            self.out.facts.functions.insert(method.join("."));
        }
        self.object(obj, ctx);
    }

    fn range_var(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
        let (schema, rel) = (s("schemaname"), s("relname"));
        if schema.is_empty() && ctx.ctes.contains(rel) {
            return;
        }
        let access = if ctx.explain_only {
            SqlClass::Read
        } else {
            ctx.access
        };
        self.out.facts.objects.insert(ObjectRef {
            name: qualify(schema, rel),
            access,
        });
        // An alias or anything else nested in a RangeVar holds no relations or calls.
    }

    fn dropped_objects(&mut self, obj: &Map<String, Value>) {
        for o in obj
            .get("objects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(items) = o.pointer("/node/List/items").and_then(Value::as_array) else {
                continue;
            };
            let parts: Vec<&str> = items
                .iter()
                .filter_map(|i| i.pointer("/node/String/sval")?.as_str())
                .collect();
            let name = match parts.as_slice() {
                [rel] => qualify("", rel),
                [schema, rel] => qualify(schema, rel),
                _ => parts.join("."),
            };
            self.out.facts.objects.insert(ObjectRef {
                name,
                access: SqlClass::Ddl,
            });
        }
    }

    fn func_call(&mut self, obj: &Map<String, Value>, ctx: Ctx<'_>) {
        let parts: Vec<&str> = obj
            .get("funcname")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.pointer("/node/String/sval")?.as_str())
            .collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("", *name),
            [schema, name] => (*schema, *name),
            _ => ("?", "?"),
        };
        let builtin = schema.is_empty() || schema == "pg_catalog";
        if builtin && name == "set_config" {
            self.out.facts.class(SqlClass::Admin, || {
                "set_config() changes session settings".into()
            });
        } else if !(builtin && SAFE_FUNCTIONS.binary_search(&name).is_ok()) {
            let full = if schema.is_empty() {
                name.to_owned()
            } else {
                format!("{schema}.{name}")
            };
            // Not a class of its own: a grant may list the function (or allow `exec`, any function).
            self.out.facts.functions.insert(full);
        }
        // Arguments, FILTER, OVER, ORDER BY inside the call are walked like anything else.
        self.object(obj, ctx);
    }
}

fn qualify(schema: &str, rel: &str) -> String {
    if !schema.is_empty() {
        format!("{schema}.{rel}")
    } else if rel.starts_with("pg_") {
        // pg_catalog is searched first, implicitly.
        format!("pg_catalog.{rel}")
    } else {
        format!("public.{rel}")
    }
}

fn describe(kind: &str, obj: &Map<String, Value>) -> String {
    match obj.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => format!("{kind} `{n}`"),
        _ => kind.to_string(),
    }
}

/// A `DefElem` argument that says false/off/0 (absent means true).
fn def_elem_is_false(arg: Option<&Value>) -> bool {
    let Some(arg) = arg else { return false };
    let ival = arg
        .pointer("/node/AConst/val/Ival/ival")
        .and_then(Value::as_i64);
    let bval = arg
        .pointer("/node/AConst/val/Boolval/boolval")
        .and_then(Value::as_bool);
    let sval = arg
        .pointer("/node/String/sval")
        .or_else(|| arg.pointer("/node/AConst/val/Sval/sval"))
        .and_then(Value::as_str);
    ival == Some(0) || bval == Some(false) || matches!(sval, Some("false" | "off" | "0" | "no"))
}

/// `SET`/`RESET`: harmless parameters are `session`; read-write toggles, role and
/// authorization changes, search_path, string-parsing modes and everything unknown are `admin`.
fn variable_set_class(obj: &Map<String, Value>) -> SqlClass {
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match name.as_str() {
        // RESET ALL resets default_transaction_read_only too.
        "" => SqlClass::Admin,
        "transaction" | "session characteristics" => {
            if sets_read_write(obj.get("args")) {
                SqlClass::Admin
            } else {
                SqlClass::Transaction
            }
        }
        n if SAFE_SETTINGS.contains(&n) => SqlClass::Session,
        _ => SqlClass::Admin,
    }
}

/// Whether a list of transaction-mode options (`BEGIN …`, `SET TRANSACTION …`) says READ WRITE.
fn sets_read_write(options: Option<&Value>) -> bool {
    options.and_then(Value::as_array).is_some_and(|opts| {
        opts.iter().any(|o| {
            o.pointer("/node/DefElem/defname").and_then(Value::as_str)
                == Some("transaction_read_only")
                && def_elem_is_false(o.pointer("/node/DefElem/arg"))
        })
    })
}

fn transaction_class(obj: &Map<String, Value>) -> SqlClass {
    // PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED (an empty gid is still a gid).
    const TWO_PHASE: [i64; 3] = [8, 9, 10];
    let two_phase = obj
        .get("kind")
        .and_then(Value::as_i64)
        .is_some_and(|k| TWO_PHASE.contains(&k));
    let gid = two_phase
        || obj
            .get("gid")
            .and_then(Value::as_str)
            .is_some_and(|g| !g.is_empty());
    // PREPARE TRANSACTION / COMMIT PREPARED outlive the session; READ WRITE lifts read-only.
    if gid || sets_read_write(obj.get("options")) {
        SqlClass::Admin
    } else {
        SqlClass::Transaction
    }
}

/// Session parameters an agent may set: output formats, timeouts, names. Not here on purpose:
/// role, session_authorization, search_path, default_transaction_read_only,
/// transaction_read_only, row_security; and standard_conforming_strings, backslash_quote and
/// client_encoding, which change how the server reads the bytes of later statements (SJIS, BIG5
/// or GBK can swallow a backslash into a multibyte character): a parser differential with the
/// classifier, which reads UTF-8. Nor bytea_output: `escape` shows text cast to bytea as
/// text, past the masking detectors (hex, the default, is an encoding like any other). Also
/// anything not listed.
const SAFE_SETTINGS: &[&str] = &[
    "application_name",
    "client_min_messages",
    "datestyle",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "intervalstyle",
    "lock_timeout",
    "statement_timeout",
    "timezone",
];

/// pg_catalog functions that have side effects (volatile) or run SQL given as text, from
/// PostgreSQL 15's pg_proc (see the file's origin in its commit): a field name matching one may
/// be an attribute-notation call.
static ATTRIBUTE_CALL_FUNCTIONS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| {
        let mut v: Vec<&str> = include_str!("attribute_call_functions.txt")
            .lines()
            .filter(|l| !l.is_empty())
            .collect();
        v.sort_unstable();
        v
    });

/// Built-in functions that only compute: no writes, no side effects, no file or network access,
/// no dynamic SQL. Sorted (binary search). Anything else is `exec`.
const SAFE_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_length",
    "array_lower",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_length",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "coalesce",
    "col_description",
    "concat",
    "concat_ws",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "current_database",
    "current_schema",
    "current_schemas",
    "current_setting",
    "date_bin",
    "date_part",
    "date_trunc",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "extract",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gcd",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_sequence_privilege",
    "has_table_privilege",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object",
    "json_object_agg",
    "json_object_keys",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_query",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lcm",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "obj_description",
    "octet_length",
    "overlay",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_backend_pid",
    "pg_collation_is_visible",
    "pg_column_size",
    "pg_conversion_is_visible",
    "pg_database_size",
    "pg_encoding_to_char",
    "pg_function_is_visible",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_function_arguments",
    "pg_get_function_identity_arguments",
    "pg_get_function_result",
    "pg_get_indexdef",
    "pg_get_partition_constraintdef",
    "pg_get_partkeydef",
    "pg_get_ruledef",
    "pg_get_serial_sequence",
    "pg_get_statisticsobjdef_columns",
    "pg_get_triggerdef",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_has_role",
    "pg_indexes_size",
    "pg_opclass_is_visible",
    "pg_operator_is_visible",
    "pg_opfamily_is_visible",
    "pg_postmaster_start_time",
    "pg_relation_is_publishable",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_table_is_visible",
    "pg_table_size",
    "pg_tablespace_location",
    "pg_total_relation_size",
    "pg_ts_config_is_visible",
    "pg_ts_dict_is_visible",
    "pg_ts_parser_is_visible",
    "pg_ts_template_is_visible",
    "pg_type_is_visible",
    "pi",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "timeofday",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "translate",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "width_bucket",
];

#[cfg(test)]
mod tests {
    use super::*;
    use SqlClass::*;

    fn classes(sql: &str) -> Vec<SqlClass> {
        let c = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.facts.classes.into_iter().collect()
    }

    fn objects(sql: &str) -> Vec<(String, SqlClass)> {
        classify(sql)
            .unwrap()
            .facts
            .objects
            .into_iter()
            .map(|o| (o.name, o.access))
            .collect()
    }

    #[test]
    fn safe_functions_are_sorted() {
        assert!(
            SAFE_FUNCTIONS.windows(2).all(|w| w[0] < w[1]),
            "keep SAFE_FUNCTIONS sorted and unique"
        );
    }

    #[test]
    fn objects_and_access() {
        assert_eq!(
            objects("SELECT * FROM users"),
            [("public.users".into(), Read)]
        );
        assert_eq!(
            objects("select relname from pg_class"),
            [("pg_catalog.pg_class".into(), Read)]
        );
        assert_eq!(
            objects("INSERT INTO audit.log SELECT * FROM public.users"),
            [("audit.log".into(), Write), ("public.users".into(), Read)]
        );
        assert_eq!(
            objects("CREATE VIEW v AS SELECT * FROM t"),
            [("public.t".into(), Read), ("public.v".into(), Ddl)]
        );
        assert_eq!(
            objects("DROP TABLE s.t, u"),
            [("public.u".into(), Ddl), ("s.t".into(), Ddl)]
        );
    }

    #[test]
    fn cte_names_are_not_relations_but_only_in_scope() {
        assert_eq!(objects("WITH x AS (SELECT 1) SELECT * FROM x"), []);
        // The second `s` is outside the CTE's scope: the real table public.s.
        assert_eq!(
            objects("SELECT * FROM (WITH s AS (SELECT 1) SELECT * FROM s) a, s"),
            [("public.s".into(), Read)]
        );
    }

    #[test]
    fn cte_names_do_not_hide_real_tables() {
        let o = |sql: &str| objects(sql);
        assert_eq!(
            o("WITH t AS (SELECT 1) DELETE FROM t"),
            [("public.t".into(), Write)]
        );
        assert_eq!(
            o("WITH t AS (SELECT 1) INSERT INTO t SELECT 1"),
            [("public.t".into(), Write)]
        );
        assert_eq!(
            o("WITH t AS (SELECT * FROM t) SELECT * FROM t"),
            [("public.t".into(), Read)]
        );
        assert_eq!(
            o("WITH a AS (SELECT * FROM t), t AS (SELECT 1) SELECT * FROM a"),
            [("public.t".into(), Read)]
        );
        assert_eq!(
            o(
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r"
            ),
            []
        );
    }

    #[test]
    fn literals_that_decide_are_read_and_never_shared_by_shape() {
        for sql in [
            "PREPARE TRANSACTION ''",
            "COMMIT PREPARED ''",
            "ROLLBACK PREPARED 'x'",
            "COPY users TO ''",
            "COPY users FROM ''",
        ] {
            let c = classify(sql).unwrap();
            assert!(
                c.facts.classes.contains(&Admin),
                "{sql}: {:?}",
                c.facts.classes
            );
        }
        assert!(
            !classify("COPY users TO STDOUT")
                .unwrap()
                .facts
                .classes
                .contains(&Admin)
        );
        assert!(
            !classify("copy (select 1) to stdout; copy users from stdin")
                .unwrap()
                .facts
                .classes
                .contains(&Admin)
        );
        assert!(
            classify("COPY users TO STDOUT; COPY users TO ''")
                .unwrap()
                .facts
                .classes
                .contains(&Admin),
            "per statement"
        );
        for sql in [
            "EXPLAIN (ANALYZE 'off') SELECT 1",
            "COPY users TO STDOUT",
            "BEGIN READ ONLY",
            "SET TRANSACTION READ ONLY",
        ] {
            assert!(classify(sql).unwrap().depends_on_constants, "{sql}");
        }
    }

    #[test]
    fn hidden_calls_and_writes_are_found() {
        let f = classify("SELECT 1 LIMIT (SELECT lo_unlink(1))")
            .unwrap()
            .facts;
        assert_eq!(
            (
                f.effective_classes().into_iter().collect::<Vec<_>>(),
                f.functions.len()
            ),
            (vec![Read, Exec], 1)
        );
        let f = classify("VALUES (pg_sleep(1))").unwrap().facts;
        assert_eq!(f.functions.into_iter().collect::<Vec<_>>(), ["pg_sleep"]);
        assert_eq!(
            classes("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
            [Read, Write]
        );
        assert_eq!(
            classes("SELECT count(*) OVER (PARTITION BY lower(x)) FROM t"),
            [Read]
        );
        assert!(
            classify("SELECT * FROM t TABLESAMPLE SYSTEM (1)")
                .unwrap()
                .facts
                .functions
                .is_empty()
        );
        let f = classify("SELECT * FROM t TABLESAMPLE system_rows (1)")
            .unwrap()
            .facts;
        assert_eq!(f.functions.into_iter().collect::<Vec<_>>(), ["system_rows"]);
        let f = classify("SELECT public.evil(1)").unwrap().facts;
        assert_eq!(f.functions.into_iter().collect::<Vec<_>>(), ["public.evil"]);
    }
}
