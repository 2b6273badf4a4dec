//! The part of sentencepiece's `ModelProto` (`sentencepiece_model.proto`, proto2) that encoding
//! needs, decoded from the protobuf wire format by hand: the pieces, the trainer flags that change
//! encoding, and the normalizer spec. Unknown fields are skipped; malformed input is an error.

/// A decoding failure: what was wrong, in words.
pub(super) type Reason = String;

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// `ModelProto.SentencePiece`.
#[derive(Debug, Clone)]
pub(super) struct PieceProto {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

/// The `TrainerSpec` fields that matter at encoding time.
#[derive(Debug, Clone)]
pub(super) struct TrainerProto {
    pub model_type: ModelType,
    pub treat_whitespace_as_suffix: bool,
    pub byte_fallback: bool,
}

/// `NormalizerSpec` (proto2 defaults: the three flags are true when absent).
#[derive(Debug, Clone)]
pub(super) struct NormalizerProto {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// `ModelProto` (fields 1, 2 and 3; the self-test data and denormalizer are skipped).
#[derive(Debug, Clone)]
pub(super) struct ModelProto {
    pub pieces: Vec<PieceProto>,
    pub trainer: TrainerProto,
    pub normalizer: NormalizerProto,
}

impl Default for TrainerProto {
    fn default() -> Self {
        Self { model_type: ModelType::Unigram, treat_whitespace_as_suffix: false, byte_fallback: false }
    }
}

impl Default for NormalizerProto {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

impl ModelProto {
    /// Decodes a serialized `ModelProto`. Like protobuf, a message field that occurs twice is
    /// merged and a scalar that occurs twice keeps the last value.
    pub fn decode(buf: &[u8]) -> Result<Self, Reason> {
        let mut pieces = Vec::new();
        let mut trainer = TrainerProto::default();
        let mut normalizer = NormalizerProto::default();
        let mut fields = Fields::new(buf);
        while let Some((number, value)) = fields.next_field()? {
            match number {
                1 => pieces.push(decode_piece(value.bytes("ModelProto.pieces")?)?),
                2 => merge_trainer(&mut trainer, value.bytes("ModelProto.trainer_spec")?)?,
                3 => merge_normalizer(&mut normalizer, value.bytes("ModelProto.normalizer_spec")?)?,
                _ => {}
            }
        }
        Ok(Self { pieces, trainer, normalizer })
    }
}

fn decode_piece(buf: &[u8]) -> Result<PieceProto, Reason> {
    let mut piece = PieceProto { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut fields = Fields::new(buf);
    while let Some((number, value)) = fields.next_field()? {
        match number {
            1 => piece.piece = value.string("SentencePiece.piece")?,
            2 => piece.score = f32::from_bits(value.fixed32("SentencePiece.score")?),
            3 => {
                piece.kind = match value.varint("SentencePiece.type")? {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    t => return Err(format!("piece type {t} is not a sentencepiece piece type")),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn merge_trainer(spec: &mut TrainerProto, buf: &[u8]) -> Result<(), Reason> {
    let mut fields = Fields::new(buf);
    while let Some((number, value)) = fields.next_field()? {
        match number {
            3 => {
                spec.model_type = match value.varint("TrainerSpec.model_type")? {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    t => return Err(format!("model type {t} is not a sentencepiece model type")),
                }
            }
            24 => spec.treat_whitespace_as_suffix = value.varint("TrainerSpec.treat_whitespace_as_suffix")? != 0,
            35 => spec.byte_fallback = value.varint("TrainerSpec.byte_fallback")? != 0,
            _ => {}
        }
    }
    Ok(())
}

fn merge_normalizer(spec: &mut NormalizerProto, buf: &[u8]) -> Result<(), Reason> {
    let mut fields = Fields::new(buf);
    while let Some((number, value)) = fields.next_field()? {
        match number {
            1 => spec.name = value.string("NormalizerSpec.name")?,
            2 => spec.precompiled_charsmap = value.bytes("NormalizerSpec.precompiled_charsmap")?.to_vec(),
            3 => spec.add_dummy_prefix = value.varint("NormalizerSpec.add_dummy_prefix")? != 0,
            4 => spec.remove_extra_whitespaces = value.varint("NormalizerSpec.remove_extra_whitespaces")? != 0,
            5 => spec.escape_whitespaces = value.varint("NormalizerSpec.escape_whitespaces")? != 0,
            _ => {}
        }
    }
    Ok(())
}

/// One field value as it appears on the wire.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn wire_mismatch(&self, field: &str, want: &str) -> Reason {
        let got = match self {
            Value::Varint(_) => "a varint",
            Value::Fixed64 => "a 64-bit value",
            Value::Bytes(_) => "a length-delimited value",
            Value::Fixed32(_) => "a 32-bit value",
        };
        format!("field {field} should be {want} but is {got}")
    }

    fn varint(&self, field: &str) -> Result<u64, Reason> {
        match self {
            Value::Varint(v) => Ok(*v),
            _ => Err(self.wire_mismatch(field, "a varint")),
        }
    }

    fn fixed32(&self, field: &str) -> Result<u32, Reason> {
        match self {
            Value::Fixed32(v) => Ok(*v),
            _ => Err(self.wire_mismatch(field, "a 32-bit value")),
        }
    }

    fn bytes(&self, field: &str) -> Result<&'a [u8], Reason> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.wire_mismatch(field, "a length-delimited value")),
        }
    }

    fn string(&self, field: &str) -> Result<String, Reason> {
        let bytes = self.bytes(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("field {field} is not valid UTF-8"))
    }
}

/// Iterates over the `(field number, value)` pairs of one message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, Reason> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(format!("field number 0 at byte {}", self.pos));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| format!("length {len} does not fit in memory"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(format!("unsupported wire type {wire} at byte {}", self.pos)),
        };
        Ok(Some((number, value)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Reason> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated: {n} bytes wanted at byte {} of a {}-byte message", self.pos, self.buf.len())
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn varint(&mut self) -> Result<u64, Reason> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes before byte {}", self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_defaults_and_pieces() {
        // pieces { piece: "a" score: 0.5 type: UNKNOWN }, normalizer_spec { add_dummy_prefix: false }
        let piece = [0x0a, 0x01, b'a', 0x15, 0x00, 0x00, 0x00, 0x3f, 0x18, 0x02];
        let mut buf = vec![0x0a, piece.len() as u8];
        buf.extend_from_slice(&piece);
        buf.extend_from_slice(&[0x1a, 0x02, 0x18, 0x00]);
        let m = ModelProto::decode(&buf).unwrap();
        assert_eq!(m.pieces.len(), 1);
        assert_eq!(m.pieces[0].piece, "a");
        assert_eq!(m.pieces[0].score, 0.5);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert!(!m.normalizer.add_dummy_prefix);
        assert!(m.normalizer.remove_extra_whitespaces && m.normalizer.escape_whitespaces);
        assert_eq!(m.trainer.model_type, ModelType::Unigram);
    }

    #[test]
    fn rejects_truncation_and_bad_wire_types() {
        assert!(ModelProto::decode(&[0x0a, 0x05, b'a']).is_err());
        assert!(ModelProto::decode(&[0x0a]).is_err());
        assert!(ModelProto::decode(&[0x0b]).is_err()); // wire type 3 (group)
        assert!(ModelProto::decode(&[0x08, 0x01]).is_err()); // pieces as a varint
        assert!(ModelProto::decode(&[0xff; 12]).is_err());
    }
}
