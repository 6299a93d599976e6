//! A bounds-checked cursor over the body of one packet. Every read that would run past the
//! end of the packet (or of a property section) is a Malformed error, never a panic, and
//! binary fields come out as zero-copy slices of the packet's `Bytes`.

use bytes::Bytes;

use super::error::DecodeError;

/// The error for a field that does not fit in what is left of the packet (MQTT 5 §1.5).
pub(super) const SHORT: DecodeError = DecodeError::Malformed("packet ends inside a field");

/// Parses a Variable Byte Integer (MQTT 5 §1.5.5, MQTT 3.1.1 §2.2.3) from the front of
/// `bytes`: `Ok(None)` when more bytes are needed, else the value and how many bytes it took.
/// At most four bytes, and the encoding must be minimal (MQTT-1.5.5-1): a multi-byte
/// encoding whose last byte is 0 could have been shorter.
pub(crate) fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed(
                    "variable byte integer not minimally encoded",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    } else {
        Ok(None)
    }
}

/// What a decoder accepts beyond the packet size: fields a peer may repeat as often as the
/// packet's size allows, and which cost memory per repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest packet, fixed header included.
    pub max_packet_size: u32,
    /// Most User Properties in one property section.
    pub max_user_properties: usize,
    /// Most bytes of User Property names and values in one property section.
    pub max_user_property_bytes: usize,
    /// Most topic filters in one SUBSCRIBE or UNSUBSCRIBE.
    pub max_filters: usize,
}

impl DecodeLimits {
    /// Only the packet size is limited.
    pub const fn size_only(max_packet_size: u32) -> DecodeLimits {
        DecodeLimits {
            max_packet_size,
            max_user_properties: usize::MAX,
            max_user_property_bytes: usize::MAX,
            max_filters: usize::MAX,
        }
    }
}

/// Reads the fields of one packet body front to back.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
    /// What the packet may repeat (the packet size is checked before a reader exists).
    pub(crate) limits: DecodeLimits,
}

impl<'a> Reader<'a> {
    /// A reader over the whole of `data`, without limits on repeated fields.
    pub(crate) fn new(data: &'a Bytes) -> Reader<'a> {
        Reader::limited(data, DecodeLimits::size_only(u32::MAX))
    }

    /// A reader over the whole of `data` that enforces `limits`.
    pub(crate) fn limited(data: &'a Bytes, limits: DecodeLimits) -> Reader<'a> {
        Reader {
            data,
            pos: 0,
            end: data.len(),
            limits,
        }
    }

    /// True when every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    fn range(&mut self, n: usize) -> Result<(usize, usize), DecodeError> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.end)
            .ok_or(SHORT)?;
        self.pos = end;
        Ok((start, end))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (start, end) = self.range(n)?;
        self.data.get(start..end).ok_or(SHORT)
    }

    /// One byte.
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        match self.take(1)? {
            [b] => Ok(*b),
            _ => Err(SHORT),
        }
    }

    /// A Two Byte Integer, big-endian.
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        match self.take(2)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(SHORT),
        }
    }

    /// A Four Byte Integer, big-endian.
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        match self.take(4)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(SHORT),
        }
    }

    /// A Variable Byte Integer; it must end inside the packet.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let avail = self.data.get(self.pos..self.end).ok_or(SHORT)?;
        let (value, len) = parse_varint(avail)?.ok_or(SHORT)?;
        self.range(len)?;
        Ok(value)
    }

    /// Two-byte length then that many raw bytes, borrowed.
    pub(crate) fn prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 Encoded String (MQTT 5 §1.5.4): well-formed UTF-8 (which excludes surrogates
    /// and overlong forms, MQTT-1.5.4-1) without U+0000 (MQTT-1.5.4-2).
    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let raw = self.prefixed()?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
        if raw.contains(&0) {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s)
    }

    /// Binary Data (two-byte length then bytes), as a zero-copy slice of the packet.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        let (start, end) = self.range(usize::from(len))?;
        Ok(self.data.slice(start..end))
    }

    /// Everything left, as a zero-copy slice of the packet.
    pub(crate) fn rest(&mut self) -> Bytes {
        let (start, end) = (self.pos.min(self.end), self.end);
        self.pos = end;
        self.data.slice(start..end)
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        let (start, end) = self.range(n)?;
        Ok(Reader {
            data: self.data,
            pos: start,
            end,
            limits: self.limits,
        })
    }

    /// Fails if bytes are left over: a packet must end where its last field ends.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "unexpected bytes after the last field",
            ))
        }
    }
}
