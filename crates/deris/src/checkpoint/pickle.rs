//! A small reader for Python pickles (protocols 0 to 5), enough to walk what `torch.save` writes.
//!
//! Nothing is executed: a call (`REDUCE`, `NEWOBJ`, `INST`, `OBJ`) is kept as [`Value::Call`] for
//! the caller to interpret, and `BUILD` keeps the object and drops its state. Containers are shared (`Rc`), so the
//! memo keeps Python's reference semantics (a dict filled after it was memoised is seen filled)
//! and a repeated `GET` costs nothing. Every read is bounds-checked: malformed input gives an
//! error message, never a panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A shared, mutable container, as Python objects are.
pub type Shared<T> = Rc<RefCell<T>>;

/// An unpickled object.
#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in an `i64` (its value is not needed by anything we read).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Shared<Vec<Value>>),
    /// Insertion-ordered `(key, value)` pairs; `OrderedDict` and `defaultdict` become this too.
    Dict(Shared<Vec<(Value, Value)>>),
    Set(Shared<Vec<Value>>),
    /// A `module.name` reference (`GLOBAL`, `STACK_GLOBAL`).
    Global {
        module: Rc<str>,
        name: Rc<str>,
    },
    /// `func(*args)`, not executed.
    Call {
        func: Rc<Value>,
        args: Rc<Value>,
    },
    /// The argument of a persistent load (`torch.save` uses it for storages).
    PersistentId(Rc<Value>),
}

impl Value {
    /// A short Python-like type name for messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Call { func, .. } => format!("{} object", func.kind()),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }

    /// A one-line description for logs: the value of a scalar, the size of a container.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => (if *b { "True" } else { "False" }).into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) if s.chars().count() > 40 => format!("'{}…'", s.chars().take(40).collect::<String>()),
            Value::Str(s) => format!("'{s}'"),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Tuple(t) => format!("tuple of {}", t.len()),
            Value::List(l) => format!("list of {}", l.borrow().len()),
            Value::Dict(d) => format!("dict of {}", d.borrow().len()),
            Value::Set(s) => format!("set of {}", s.borrow().len()),
            other => other.kind(),
        }
    }

    /// `Some((module, name))` for a global reference.
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
}

/// Unpickles one object from `data`.
pub fn load(data: &[u8]) -> Result<Value, String> {
    let mut m = Machine { input: Input { data, pos: 0 }, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let at = m.input.pos;
        let op = m.input.byte()?;
        if m.step(op).map_err(|e| format!("pickle opcode 0x{op:02x} at byte {at}: {e}"))? {
            break;
        }
    }
    let top = m.pop()?;
    if !m.stack.is_empty() || !m.marks.is_empty() {
        return Err("pickle stream ends with objects left on the stack".into());
    }
    Ok(top)
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("truncated pickle: {n} bytes wanted at byte {}, {} available", self.pos, self.data.len() - self.pos)
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn len_u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.array()?)).map_err(|_| "length does not fit in memory".to_string())
    }

    /// The bytes up to the next `\n` (excluded), for the text opcodes of protocol 0.
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle: missing end of line")?;
        self.pos += n + 1;
        let line = &rest[..n];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        std::str::from_utf8(line).map_err(|_| "text opcode argument is not UTF-8".to_string())
    }
}

struct Machine<'a> {
    input: Input<'a>,
    stack: Vec<Value>,
    /// Stack lengths at each open `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

fn int_from_le(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        // Python writes the minimal two's complement, so a 9+ byte long never fits in i64.
        return Value::BigInt;
    }
    if bytes.is_empty() {
        return Value::Int(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

fn parse_int(text: &str) -> Value {
    text.trim_end_matches('L').parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt)
}

fn string(bytes: &[u8]) -> Result<Value, String> {
    Ok(Value::Str(std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())?.into()))
}

fn shared<T>(v: T) -> Shared<T> {
    Rc::new(RefCell::new(v))
}

impl Machine<'_> {
    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pop across a MARK".into());
        }
        self.stack.pop().ok_or_else(|| "pop from an empty stack".to_string())
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "empty stack".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("MARK above the stack top".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, key: u64) -> Result<Value, String> {
        self.memo.get(&key).cloned().ok_or_else(|| format!("memo key {key} not defined"))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn call(func: Value, args: Value) -> Value {
        if let Some((module, name)) = func.as_global() {
            let is_dict = matches!(
                (module, name),
                ("collections", "OrderedDict")
                    | ("collections", "defaultdict")
                    | ("builtins", "dict")
                    | ("__builtin__", "dict")
            );
            if is_dict {
                // Its items arrive by SETITEMS; the constructor arguments (e.g. a default factory)
                // do not matter for reading.
                return Value::Dict(shared(Vec::new()));
            }
        }
        Value::Call { func: Rc::new(func), args: Rc::new(args) }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if items.len() % 2 != 0 {
            return Err("odd number of items for SETITEMS".into());
        }
        // Items set on something that is not a dict (an object's __setitem__) are not needed.
        if let Value::Dict(d) = self.top()? {
            let mut d = d.borrow_mut();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(l) | Value::Set(l) => l.borrow_mut().extend(items),
            _ => {} // extending an arbitrary object: nothing we read needs it
        }
        Ok(())
    }

    /// Executes one opcode; `Ok(true)` at STOP.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        let v = match op {
            b'.' => return Ok(true), // STOP
            0x80 => {
                let proto = self.input.byte()?; // PROTO
                if proto > 5 {
                    return Err(format!("unsupported pickle protocol {proto}"));
                }
                return Ok(false);
            }
            0x95 => {
                self.input.take(8)?; // FRAME: a length hint only
                return Ok(false);
            }
            b'(' => {
                self.marks.push(self.stack.len()); // MARK
                return Ok(false);
            }
            b'0' => {
                self.pop()?; // POP
                return Ok(false);
            }
            b'1' => {
                self.pop_mark()?; // POP_MARK
                return Ok(false);
            }
            b'2' => self.top()?.clone(), // DUP
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'I' => match self.input.line()? {
                "00" => Value::Bool(false),
                "01" => Value::Bool(true),
                s => parse_int(s),
            },
            b'L' => parse_int(self.input.line()?),
            b'J' => Value::Int(i32::from_le_bytes(self.input.array()?) as i64),
            b'K' => Value::Int(self.input.byte()? as i64),
            b'M' => Value::Int(u16::from_le_bytes(self.input.array()?) as i64),
            0x8a => {
                let n = self.input.byte()? as usize; // LONG1
                int_from_le(self.input.take(n)?)
            }
            0x8b => {
                let n = self.input.len_u32()?; // LONG4
                int_from_le(self.input.take(n)?)
            }
            b'F' => Value::Float(self.input.line()?.trim().parse::<f64>().map_err(|e| format!("FLOAT: {e}"))?),
            b'G' => Value::Float(f64::from_be_bytes(self.input.array()?)),
            b'S' => {
                let s = self.input.line()?; // STRING: a quoted repr; the quotes are dropped
                Value::Str(s.trim_matches(|c| c == '\'' || c == '"').into())
            }
            b'V' => Value::Str(self.input.line()?.into()), // UNICODE (raw-unicode-escape)
            b'T' => {
                let n = self.input.len_u32()?; // BINSTRING
                Value::Bytes(self.input.take(n)?.into())
            }
            b'U' => {
                let n = self.input.byte()? as usize; // SHORT_BINSTRING
                Value::Bytes(self.input.take(n)?.into())
            }
            b'X' => {
                let n = self.input.len_u32()?; // BINUNICODE
                string(self.input.take(n)?)?
            }
            0x8c => {
                let n = self.input.byte()? as usize; // SHORT_BINUNICODE
                string(self.input.take(n)?)?
            }
            0x8d => {
                let n = self.input.len_u64()?; // BINUNICODE8
                string(self.input.take(n)?)?
            }
            b'B' => {
                let n = self.input.len_u32()?; // BINBYTES
                Value::Bytes(self.input.take(n)?.into())
            }
            b'C' => {
                let n = self.input.byte()? as usize; // SHORT_BINBYTES
                Value::Bytes(self.input.take(n)?.into())
            }
            0x8e | 0x96 => {
                let n = self.input.len_u64()?; // BINBYTES8, BYTEARRAY8
                Value::Bytes(self.input.take(n)?.into())
            }
            0x97 => return Err("out-of-band buffers (NEXT_BUFFER) are not supported".into()),
            0x98 => return Ok(false), // READONLY_BUFFER: no-op for us
            b')' => Value::Tuple(Rc::from(Vec::new())),
            b't' => Value::Tuple(self.pop_mark()?.into()),
            0x85 => {
                let a = self.pop()?;
                Value::Tuple(Rc::from(vec![a]))
            }
            0x86 => {
                let b = self.pop()?;
                let a = self.pop()?;
                Value::Tuple(Rc::from(vec![a, b]))
            }
            0x87 => {
                let c = self.pop()?;
                let b = self.pop()?;
                let a = self.pop()?;
                Value::Tuple(Rc::from(vec![a, b, c]))
            }
            b']' => Value::List(shared(Vec::new())),
            b'l' => Value::List(shared(self.pop_mark()?)),
            b'}' => Value::Dict(shared(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Dict(shared(Vec::new())));
                self.set_items(items)?;
                return Ok(false);
            }
            0x8f => Value::Set(shared(Vec::new())),
            0x91 => Value::Set(shared(self.pop_mark()?)), // FROZENSET
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
                return Ok(false);
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?; // APPENDS, ADDITEMS
                self.append(items)?;
                return Ok(false);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
                return Ok(false);
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
                return Ok(false);
            }
            b'c' => {
                let module = self.input.line()?.into();
                let name = self.input.line()?.into();
                Value::Global { module, name }
            }
            0x93 => {
                let name = self.pop()?; // STACK_GLOBAL
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => Value::Global { module, name },
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            0x82..=0x84 => return Err("extension registry codes (EXT1/2/4) are not supported".into()),
            b'R' | 0x81 => {
                let args = self.pop()?; // REDUCE, NEWOBJ
                let func = self.pop()?;
                Self::call(func, args)
            }
            0x92 => {
                let _kwargs = self.pop()?; // NEWOBJ_EX
                let args = self.pop()?;
                let func = self.pop()?;
                Self::call(func, args)
            }
            b'i' => {
                let module = self.input.line()?.into(); // INST
                let name = self.input.line()?.into();
                let args = self.pop_mark()?;
                Self::call(Value::Global { module, name }, Value::Tuple(args.into()))
            }
            b'o' => {
                let mut items = self.pop_mark()?; // OBJ
                if items.is_empty() {
                    return Err("OBJ without a class".into());
                }
                let func = items.remove(0);
                Self::call(func, Value::Tuple(items.into()))
            }
            b'b' => {
                // BUILD: the state (e.g. a state_dict's `_metadata`) is not needed for reading.
                self.pop()?;
                return Ok(false);
            }
            b'P' => Value::PersistentId(Rc::new(Value::Str(self.input.line()?.into()))),
            b'Q' => {
                let id = self.pop()?;
                Value::PersistentId(Rc::new(id))
            }
            b'g' => {
                let key = self.input.line()?.parse::<u64>().map_err(|e| format!("GET: {e}"))?;
                self.memo_get(key)?
            }
            b'h' => {
                let key = self.input.byte()? as u64;
                self.memo_get(key)?
            }
            b'j' => {
                let key = self.input.len_u32()? as u64;
                self.memo_get(key)?
            }
            b'p' => {
                let key = self.input.line()?.parse::<u64>().map_err(|e| format!("PUT: {e}"))?;
                self.memo_put(key)?;
                return Ok(false);
            }
            b'q' => {
                let key = self.input.byte()? as u64;
                self.memo_put(key)?;
                return Ok(false);
            }
            b'r' => {
                let key = self.input.len_u32()? as u64;
                self.memo_put(key)?;
                return Ok(false);
            }
            0x94 => {
                let key = self.memo.len() as u64; // MEMOIZE
                self.memo_put(key)?;
                return Ok(false);
            }
            other => return Err(format!("unknown opcode 0x{other:02x} (not a pickle, or a corrupt one)")),
        };
        self.stack.push(v);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict_keys(v: &Value) -> Vec<String> {
        match v {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .map(|(k, _)| match k {
                    Value::Str(s) => s.to_string(),
                    other => other.kind(),
                })
                .collect(),
            other => panic!("not a dict: {}", other.kind()),
        }
    }

    #[test]
    fn protocol2_dict_with_memo() {
        // pickle.dumps({'a': 1, 'b': [1.5, None], 'c': 'a'}, protocol=2): 'c' maps to the memoised 'a'
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00NeX\x01\x00\x00\x00cq\x04h\x01u.";
        let v = load(data).unwrap();
        assert_eq!(dict_keys(&v), vec!["a", "b", "c"]);
        let Value::Dict(d) = &v else { unreachable!() };
        let d = d.borrow();
        assert!(matches!(d[0].1, Value::Int(1)));
        let Value::List(l) = &d[1].1 else { panic!("list") };
        assert!(matches!(l.borrow()[0], Value::Float(f) if f == 1.5));
        assert!(matches!(d[2].1, Value::Str(ref s) if &**s == "a"));
    }

    #[test]
    fn protocol4_frame_memoize_short_unicode() {
        // pickle.dumps({'k': (1, -2, 2**70)}, protocol=4)
        let data = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01k\x94K\x01J\xfe\xff\xff\xff\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@\x87\x94s.";
        let v = load(data).unwrap();
        let Value::Dict(d) = &v else { panic!("dict") };
        let Value::Tuple(t) = &d.borrow()[0].1 else { panic!("tuple") };
        assert!(matches!(t[0], Value::Int(1)));
        assert!(matches!(t[1], Value::Int(-2)));
        assert!(matches!(t[2], Value::BigInt));
    }

    #[test]
    fn long1_sign_extension() {
        assert!(matches!(int_from_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(int_from_le(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(int_from_le(&[0x00, 0x00, 0x00, 0x00, 0x01]), Value::Int(4294967296)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for data in [
            &b""[..],
            b"\x80",
            b"\x80\x02}(",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02h\x05.",
            b"u.",
            b"(((t",
            b"\x00\x01\x02",
            b"\x80\x02]q\x00(K\x01u.",
        ] {
            assert!(load(data).is_err(), "{data:?}");
        }
    }
}
