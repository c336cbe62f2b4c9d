//! A pickle reader that describes what a pickle would build and never builds it.
//!
//! PyTorch checkpoints are pickles, and a pickle is a program: `GLOBAL` names any Python
//! callable and `REDUCE` calls it. Lightning checkpoints name Lightning's classes (a callback
//! class as a dict key, hyper-parameter objects), which do not exist here, and a hostile file can
//! name `os.system`. So nothing is ever looked up or called: a `GLOBAL` is a [`Value::Global`]
//! (a name), a `REDUCE`/`NEWOBJ`/`INST`/`OBJ` is a [`Value::Call`] (the callable and its
//! arguments, with any state or items a later `BUILD`/`SETITEMS`/`APPENDS` gives it), a
//! persistent id is a [`Value::Persistent`]. Whoever reads the result decides what a call means
//! (`io::torch` turns `torch._utils._rebuild_tensor_v2` calls into lazy tensors) and treats
//! every other call as an opaque object.
//!
//! Values live in one arena and refer to each other by index, as the objects of a real unpickler
//! refer to each other: the memo, `DUP` and `GET` copy an index, never a value, so a list
//! memoized before its items arrive is seen with its items, and a file that references one
//! object a million times costs a million indices, not a million copies.

use std::io::{BufRead, Read};

/// Index of a value in [`Pickle::values`].
pub type Id = usize;

/// A value the pickle describes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for an `i64`: its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    /// A list, also a set or frozenset (their order as written).
    List(Vec<Id>),
    /// A dict or `collections.OrderedDict`, items in the order written (a repeated key keeps
    /// both; [`Pickle::get`] finds the last, as Python would keep it).
    Dict(Vec<(Id, Id)>),
    /// A reference to a Python global (`module.name`), never resolved.
    Global {
        module: String,
        name: String,
    },
    /// A call the pickle asks for, never made: `callable(*args)`, then any state set by
    /// `BUILD` and items added by `SETITEMS`/`APPENDS` (a dict or list subclass).
    Call {
        callable: Id,
        args: Id,
        state: Option<Id>,
        items: Vec<Id>,
        pairs: Vec<(Id, Id)>,
    },
    /// A persistent id (`BINPERSID`): PyTorch's reference to a tensor storage.
    Persistent(Id),
}

/// A parsed pickle: every value it built, and the one it returned.
#[derive(Debug, Default)]
pub struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
}

impl Pickle {
    pub fn value(&self, id: Id) -> &Value {
        &self.values[id]
    }

    /// The value under string key `key` of the dict `id` (the last one if repeated).
    pub fn get(&self, id: Id, key: &str) -> Option<Id> {
        let Value::Dict(pairs) = self.value(id) else { return None };
        pairs.iter().rev().find(|(k, _)| matches!(self.value(*k), Value::Str(s) if s == key)).map(|p| p.1)
    }

    /// `module.name` when `id` is a global.
    pub fn global_name(&self, id: Id) -> Option<String> {
        match self.value(id) {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// What a value is, for messages: `int`, `str`, `an object built by posix.system`, ...
    pub fn describe(&self, id: Id) -> String {
        match self.value(id) {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global { module, name } => format!("a reference to {module}.{name}"),
            Value::Call { callable, .. } => match self.global_name(*callable) {
                Some(name) => format!("a Python object built by {name}"),
                None => "a Python object".into(),
            },
            Value::Persistent(_) => "a persistent reference".into(),
        }
    }
}

/// Why a pickle could not be read (always a malformed or unsupported stream).
#[derive(Debug)]
pub struct PickleError(pub String);

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, PickleError>;

fn bad<T>(what: impl Into<String>) -> Result<T> {
    Err(PickleError(what.into()))
}

impl From<std::io::Error> for PickleError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            PickleError("pickle ends before its STOP opcode".into())
        } else {
            PickleError(format!("pickle could not be read ({e})"))
        }
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Value(Id),
}

/// Reads one pickle from `r`, leaving `r` just past its `STOP` opcode.
pub fn read(r: &mut impl BufRead) -> Result<Pickle> {
    Machine::default().run(r)
}

#[derive(Default)]
struct Machine {
    values: Vec<Value>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u64, Id>,
}

impl Machine {
    fn new_value(&mut self, v: Value) -> Id {
        self.values.push(v);
        self.values.len() - 1
    }

    fn push(&mut self, v: Value) {
        let id = self.new_value(v);
        self.stack.push(Slot::Value(id));
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Slot::Value(id)) => Ok(id),
            Some(Slot::Mark) => bad("pickle uses a MARK as a value"),
            None => bad("pickle stack underflow"),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Slot::Value(id)) => Ok(*id),
            _ => bad("pickle stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(at) = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)) else {
            return bad("pickle has no MARK where one is needed");
        };
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::Value(id) => id,
                Slot::Mark => unreachable!("the last mark was found above"),
            })
            .collect())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let Some(&id) = self.memo.get(&key) else {
            return bad(format!("pickle memo entry {key} is missing"));
        };
        self.stack.push(Slot::Value(id));
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    /// `REDUCE`/`NEWOBJ`: a dict, list or set constructor gives the container itself (so the
    /// `SETITEMS`/`APPENDS` that follow fill it); any other callable stays a described call.
    fn call(&mut self, callable: Id, args: Id) -> Value {
        let empty_args = matches!(&self.values[args], Value::Tuple(a) if a.is_empty());
        let one_list = match &self.values[args] {
            Value::Tuple(a) if a.len() == 1 => match &self.values[a[0]] {
                Value::List(items) | Value::Tuple(items) => Some(items.clone()),
                _ => None,
            },
            _ => None,
        };
        match self.global_name(callable).as_deref() {
            Some("collections.OrderedDict" | "builtins.dict" | "__builtin__.dict") if empty_args => {
                Value::Dict(Vec::new())
            }
            Some("builtins.set" | "builtins.frozenset" | "__builtin__.set" | "__builtin__.frozenset")
                if empty_args || one_list.is_some() =>
            {
                Value::List(one_list.unwrap_or_default())
            }
            _ => Value::Call { callable, args, state: None, items: Vec::new(), pairs: Vec::new() },
        }
    }

    fn global_name(&self, id: Id) -> Option<String> {
        match &self.values[id] {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    fn append(&mut self, items: Vec<Id>) -> Result<()> {
        let top = self.top()?;
        match &mut self.values[top] {
            Value::List(list) => list.extend(items),
            Value::Call { items: extra, .. } => extra.extend(items),
            _ => return bad("pickle appends to something that is not a list"),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Id>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return bad("pickle dict items do not come in key/value pairs");
        }
        let pairs = items.chunks_exact(2).map(|p| (p[0], p[1]));
        let top = self.top()?;
        match &mut self.values[top] {
            Value::Dict(dict) => dict.extend(pairs),
            Value::Call { pairs: extra, .. } => extra.extend(pairs),
            _ => return bad("pickle sets items on something that is not a dict"),
        }
        Ok(())
    }

    fn run(mut self, r: &mut impl BufRead) -> Result<Pickle> {
        loop {
            let op = read_u8(r)?;
            match op {
                0x80 => {
                    let proto = read_u8(r)?;
                    if proto > 5 {
                        return bad(format!("pickle protocol {proto} is newer than 5"));
                    }
                }
                0x95 => {
                    read_n::<8>(r)?; // FRAME: a length hint
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle { values: self.values, root });
                }
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| PickleError("pickle stack underflow".into()))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(Slot::Value(id));
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => self.push(Value::Int(i32::from_le_bytes(read_n(r)?) as i64)),
                b'K' => self.push(Value::Int(read_u8(r)? as i64)),
                b'M' => self.push(Value::Int(u16::from_le_bytes(read_n(r)?) as i64)),
                0x8a => {
                    let n = read_u8(r)? as u64;
                    let bytes = read_bytes(r, n)?;
                    self.push(long_value(bytes));
                }
                0x8b => {
                    let n = i32::from_le_bytes(read_n(r)?);
                    if n < 0 {
                        return bad("pickle LONG4 has a negative length");
                    }
                    let bytes = read_bytes(r, n as u64)?;
                    self.push(long_value(bytes));
                }
                b'I' => {
                    let line = read_line(r)?;
                    let v = match line.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| PickleError(format!("pickle INT `{s}`")))?),
                    };
                    self.push(v);
                }
                b'L' => {
                    let line = read_line(r)?;
                    let digits = line.strip_suffix('L').unwrap_or(&line);
                    let v = match digits.parse::<i64>() {
                        Ok(v) => Value::Int(v),
                        Err(_) if digits.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) => {
                            Value::BigInt(digits.as_bytes().to_vec())
                        }
                        Err(_) => return bad(format!("pickle LONG `{line}`")),
                    };
                    self.push(v);
                }
                b'G' => self.push(Value::Float(f64::from_be_bytes(read_n(r)?))),
                b'F' => {
                    let line = read_line(r)?;
                    let v = line.parse().map_err(|_| PickleError(format!("pickle FLOAT `{line}`")))?;
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    let s = read_str(r, n)?;
                    self.push(Value::Str(s));
                }
                0x8c => {
                    let n = read_u8(r)? as u64;
                    let s = read_str(r, n)?;
                    self.push(Value::Str(s));
                }
                0x8d => {
                    let n = u64::from_le_bytes(read_n(r)?);
                    let s = read_str(r, n)?;
                    self.push(Value::Str(s));
                }
                b'V' => {
                    let line = read_line(r)?;
                    self.push(Value::Str(unescape_raw_unicode(&line)));
                }
                // Python 2 byte strings (protocols 0-2), read as text the way torch.load does by
                // default (`encoding="utf-8"`), bytes where that fails.
                b'T' => {
                    let n = i32::from_le_bytes(read_n(r)?);
                    if n < 0 {
                        return bad("pickle BINSTRING has a negative length");
                    }
                    let b = read_bytes(r, n as u64)?;
                    self.push(text_or_bytes(b));
                }
                b'U' => {
                    let n = read_u8(r)? as u64;
                    let b = read_bytes(r, n)?;
                    self.push(text_or_bytes(b));
                }
                b'S' => {
                    let line = read_line(r)?;
                    let inner = line
                        .strip_prefix(['\'', '"'])
                        .and_then(|s| s.strip_suffix(['\'', '"']))
                        .ok_or_else(|| PickleError(format!("pickle STRING `{line}` is not quoted")))?;
                    self.push(Value::Str(unescape_raw_unicode(inner)));
                }
                b'B' => {
                    let n = u32::from_le_bytes(read_n(r)?) as u64;
                    let b = read_bytes(r, n)?;
                    self.push(Value::Bytes(b));
                }
                b'C' => {
                    let n = read_u8(r)? as u64;
                    let b = read_bytes(r, n)?;
                    self.push(Value::Bytes(b));
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(read_n(r)?);
                    let b = read_bytes(r, n)?;
                    self.push(Value::Bytes(b));
                }
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items));
                }
                b']' => self.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => self.push(Value::List(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b'c' => {
                    let module = read_line(r)?;
                    let name = read_line(r)?;
                    self.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&self.values[module], &self.values[name])
                    else {
                        return bad("pickle STACK_GLOBAL expects two strings");
                    };
                    let v = Value::Global { module: module.clone(), name: name.clone() };
                    self.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args);
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args);
                    self.push(v);
                }
                b'i' => {
                    let module = read_line(r)?;
                    let name = read_line(r)?;
                    let args = self.pop_mark()?;
                    let callable = self.new_value(Value::Global { module, name });
                    let args = self.new_value(Value::Tuple(args));
                    let v = self.call(callable, args);
                    self.push(v);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return bad("pickle OBJ has no class");
                    }
                    let callable = items.remove(0);
                    let args = self.new_value(Value::Tuple(items));
                    let v = self.call(callable, args);
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // A described object keeps its state; a dict's or list's `BUILD` sets
                    // attributes (an OrderedDict's `_metadata`), not items, so it is dropped.
                    if let Value::Call { state: s, .. } = &mut self.values[target] {
                        *s = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Value::Persistent(pid));
                }
                b'P' => {
                    let line = read_line(r)?;
                    let pid = self.new_value(Value::Str(line));
                    self.push(Value::Persistent(pid));
                }
                b'q' | b'r' | b'p' => {
                    let k = memo_key(op, r)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' | b'j' | b'g' => {
                    let k = memo_key(op, r)?;
                    self.memo_get(k)?;
                }
                0x82..=0x84 => return bad("pickle uses the copyreg extension registry (EXT opcodes)"),
                0x97 | 0x98 => return bad("pickle uses out-of-band buffers (protocol 5 buffers)"),
                other => return bad(format!("byte 0x{other:02x} is not a pickle opcode")),
            }
        }
    }
}

/// The memo index after a PUT/GET opcode: one byte (`BINPUT`/`BINGET`), four
/// (`LONG_BINPUT`/`LONG_BINGET`) or a text line (protocol 0's `PUT`/`GET`).
fn memo_key(op: u8, r: &mut impl BufRead) -> Result<u64> {
    match op {
        b'q' | b'h' => Ok(read_u8(r)? as u64),
        b'r' | b'j' => Ok(u32::from_le_bytes(read_n(r)?) as u64),
        _ => {
            let line = read_line(r)?;
            line.parse().map_err(|_| PickleError(format!("pickle memo index `{line}`")))
        }
    }
}

fn long_value(bytes: Vec<u8>) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt(bytes);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut b = [if negative { 0xff } else { 0 }; 8];
    b[..bytes.len()].copy_from_slice(&bytes);
    Value::Int(i64::from_le_bytes(b))
}

fn text_or_bytes(b: Vec<u8>) -> Value {
    match String::from_utf8(b) {
        Ok(s) => Value::Str(s),
        Err(e) => Value::Bytes(e.into_bytes()),
    }
}

/// `\uXXXX`, `\UXXXXXXXX`, `\xXX` and the common backslash escapes of protocol 0's text.
fn unescape_raw_unicode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let hex = |chars: &mut std::str::Chars, n: usize| -> Option<char> {
            let digits: String = chars.by_ref().take(n).collect();
            u32::from_str_radix(&digits, 16).ok().and_then(char::from_u32)
        };
        match chars.next() {
            Some('u') => out.extend(hex(&mut chars, 4)),
            Some('U') => out.extend(hex(&mut chars, 8)),
            Some('x') => out.extend(hex(&mut chars, 2)),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn read_u8(r: &mut impl Read) -> Result<u8> {
    Ok(read_n::<1>(r)?[0])
}

fn read_n<const N: usize>(r: &mut impl Read) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// `n` bytes, allocated as they arrive: a declared length is not trusted with an allocation.
fn read_bytes(r: &mut impl Read, n: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n.min(1 << 16) as usize);
    r.take(n).read_to_end(&mut out)?;
    if (out.len() as u64) < n {
        return bad("pickle ends inside a string or bytes value");
    }
    Ok(out)
}

fn read_str(r: &mut impl Read, n: u64) -> Result<String> {
    String::from_utf8(read_bytes(r, n)?).map_err(|_| PickleError("pickle string is not UTF-8".into()))
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = Vec::new();
    r.take(1 << 20).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return bad("pickle ends inside a text line");
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| PickleError("pickle text line is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Pickle {
        read(&mut &bytes[..]).unwrap()
    }

    #[test]
    fn memo_aliases_the_object_not_a_copy() {
        // d = {}; memo[0] = d; l = [d]; d['a'] = 1 -> (l, d): both see 'a'.
        let p = parse(b"\x80\x02}q\x00]q\x01h\x00ah\x00X\x01\x00\x00\x00aK\x01s\x86.");
        let Value::Tuple(t) = p.value(p.root) else { panic!() };
        let Value::List(l) = p.value(t[0]) else { panic!() };
        assert_eq!(l[0], t[1], "the list holds the dict itself");
        assert_eq!(p.get(t[1], "a").map(|v| p.value(v).clone()), Some(Value::Int(1)));
    }

    #[test]
    fn classes_and_calls_are_described_never_resolved() {
        // {SomeClass: posix.system('x')}: a class as a key, a call as a value.
        let p = parse(b"\x80\x02}cmod.sub\nSomeClass\ncposix\nsystem\nX\x01\x00\x00\x00x\x85Rs.");
        let Value::Dict(pairs) = p.value(p.root) else { panic!() };
        assert_eq!(p.global_name(pairs[0].0).as_deref(), Some("mod.sub.SomeClass"));
        assert_eq!(p.describe(pairs[0].1), "a Python object built by posix.system");
    }

    #[test]
    fn a_dict_subclass_keeps_its_items_and_state_as_a_described_object() {
        // NEWOBJ of pl.AttributeDict, SETITEMS, BUILD: AttributeDict(lr=1) with state {}.
        let p = parse(b"\x80\x02cpl\nAttributeDict\n)\x81(X\x02\x00\x00\x00lrK\x01u}b.");
        let Value::Call { pairs, state, .. } = p.value(p.root) else { panic!() };
        assert_eq!(pairs.len(), 1);
        assert!(state.is_some());
    }

    #[test]
    fn ordered_dict_and_set_constructors_give_containers() {
        let p = parse(b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00kK\x07u}b.");
        assert_eq!(p.get(p.root, "k").map(|v| p.value(v).clone()), Some(Value::Int(7)));
        let p = parse(b"\x80\x02c__builtin__\nset\n]K\x01aK\x02a\x85R.");
        let Value::List(items) = p.value(p.root) else { panic!() };
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn ints_of_every_width() {
        // LONG1 of -2 (0xfe), of 2^64 (9 bytes), BININT2, a protocol-0 INT and LONG.
        let p =
            parse(b"\x80\x02(\x8a\x01\xfe\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01M\x10\x27I42\nL-7L\nt.");
        let Value::Tuple(t) = p.value(p.root) else { panic!() };
        let v: Vec<Value> = t.iter().map(|&i| p.value(i).clone()).collect();
        assert_eq!(v[0], Value::Int(-2));
        assert!(matches!(v[1], Value::BigInt(_)));
        assert_eq!(v[2..], [Value::Int(10000), Value::Int(42), Value::Int(-7)]);
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        for bytes in [
            &b"\x80\x02"[..],               // no STOP
            b"\x80\x02X\xff\xff\xff\x7fab", // a 2 GB string that is not there
            b"\x80\x02h\x05.",              // memo entry never stored
            b"\x80\x02t.",                  // TUPLE without MARK
            b"\x80\x02(.",                  // a MARK as the result
            b"\x80\x02K\x01K\x02s.",        // SETITEM on an int
            b"\x80\x02\xff",                // not an opcode
            b"\x80\x02\x82\x01.",           // EXT1
        ] {
            assert!(read(&mut &bytes[..]).is_err(), "{bytes:?}");
        }
    }
}
