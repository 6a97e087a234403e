//! RESP2 framing: request parsing (arrays of bulk strings, and inline
//! commands) and reply encoding. Every length is bounded before anything is
//! buffered or allocated for it.

use std::ops::Range;

/// Largest argument (a value): larger ones are skipped without buffering
/// and answered with an error.
pub const ARG_BYTES_MAX: usize = 1 << 20;
/// Largest bulk length a request may announce (Redis's default
/// `proto-max-bulk-len`): a longer one is a protocol error, answered at
/// once, instead of bytes to skip.
pub const BULK_BYTES_MAX: usize = 512 << 20;
/// Most arguments in one command.
pub const ARGS_MAX: usize = 1 << 16;
/// Largest request frame held in memory (all its arguments together).
pub const FRAME_BYTES_MAX: usize = 8 << 20;
/// Longest inline command line.
pub const INLINE_BYTES_MAX: usize = 64 << 10;
/// Longest `*N` / `$N` header line.
const HEADER_LINE_BYTES_MAX: usize = 32;

const _: () = assert!(ARG_BYTES_MAX + HEADER_LINE_BYTES_MAX < FRAME_BYTES_MAX);
const _: () = assert!(INLINE_BYTES_MAX < FRAME_BYTES_MAX);

/// What the front of a read buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole frame yet: read more. An array frame says where its
    /// parse stopped: parsed again with [`parse_resuming`] and that
    /// `resume`, once more bytes are there, it goes on from the argument it
    /// was reading (so a frame of many arguments sent a few bytes at a time
    /// costs each byte once, and a bad byte is found as soon as it comes).
    Incomplete { resume: Option<Resume> },
    /// One command of `consumed` bytes; its arguments are in `args`
    /// (possibly none: an empty inline line).
    Command { consumed: usize },
    /// An inline command of `consumed` bytes with quotes in its first
    /// `line` bytes: [`unquote`] splits them into arguments.
    Quoted { consumed: usize, line: usize },
    /// A command with an argument over [`ARG_BYTES_MAX`]: `consumed` bytes
    /// (up to that argument's header) are parsed; `skip_bytes` more belong
    /// to the argument, then its CRLF, then `skip_args` further arguments
    /// follow.
    Oversize {
        consumed: usize,
        arg_bytes: usize,
        skip_bytes: usize,
        skip_args: usize,
    },
    /// The bytes are not RESP: answer and close the connection.
    Error(ProtocolError),
}

/// Why a frame is not RESP.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum ProtocolError {
    /// A `*N` header with a bad or too large count.
    MultibulkLength,
    /// A `$N` header with a bad length, or a missing `$`.
    BulkLength,
    /// A bulk string not followed by CRLF.
    MissingCrlf,
    /// An inline line longer than [`INLINE_BYTES_MAX`].
    InlineTooLong,
    /// A frame longer than [`FRAME_BYTES_MAX`].
    FrameTooLong,
    /// An inline command with a quote left open, or a closing quote
    /// followed by something other than a space.
    UnbalancedQuotes,
}

impl ProtocolError {
    pub fn reply(self) -> String {
        let what = match self {
            ProtocolError::MultibulkLength => "invalid multibulk length".to_string(),
            ProtocolError::BulkLength => "invalid bulk length".to_string(),
            ProtocolError::MissingCrlf => "expected CRLF after a bulk string".to_string(),
            ProtocolError::InlineTooLong => {
                format!("inline command longer than {INLINE_BYTES_MAX} bytes")
            }
            ProtocolError::FrameTooLong => {
                format!("request longer than {FRAME_BYTES_MAX} bytes")
            }
            ProtocolError::UnbalancedQuotes => "unbalanced quotes in request".to_string(),
        };
        format!("-ERR Protocol error: {what}\r\n")
    }
}

/// A header line `<prefix><digits>\r\n` at the start of `buf`:
/// `Ok(Some((value, bytes)))`, `Ok(None)` when incomplete. The number is
/// read as Redis reads it (`string2ll`): an optional `-`, then `0` alone or
/// a first digit of 1 to 9 (no `+`, no leading zero, no `-0`), in one pass:
/// a byte that cannot continue it is an error at once.
fn header(buf: &[u8], err: ProtocolError) -> Result<Option<(i64, usize)>, ProtocolError> {
    let line = &buf[..buf.len().min(HEADER_LINE_BYTES_MAX)];
    let mut i = 1;
    let negative = line.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let first_digit = i;
    let mut n: i64 = 0;
    while let Some(&b) = line.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        if i > first_digit && line[first_digit] == b'0' {
            // `0` is only a number alone: `01`, `-0…`.
            return Err(err);
        }
        let d = (b - b'0') as i64;
        let next = n.checked_mul(10).and_then(|n| {
            if negative {
                n.checked_sub(d)
            } else {
                n.checked_add(d)
            }
        });
        n = next.ok_or(err)?;
        i += 1;
    }
    match (line.get(i), line.get(i + 1)) {
        _ if i + 2 > HEADER_LINE_BYTES_MAX => Err(err),
        (Some(b'\r'), Some(b'\n')) if i > first_digit && !(negative && n == 0) => {
            Ok(Some((n, i + 2)))
        }
        (None, _) | (Some(b'\r'), None) => Ok(None),
        _ => Err(err),
    }
}

/// The common header: `<prefix>` then 1 to 18 digits (no sign, no leading
/// zero) then CRLF, all in `buf`. `None` for anything else ([`header`]
/// decides what it is).
#[inline]
fn short_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    let mut i = 1;
    // 18 digits cannot overflow a usize of 64 bits.
    const _: () = assert!(usize::BITS >= 64);
    while i < buf.len().min(19) {
        let d = buf[i].wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        n = n * 10 + d as usize;
        i += 1;
    }
    (i > 1
        && (i == 2 || buf[1] != b'0')
        && buf.get(i) == Some(&b'\r')
        && buf.get(i + 1) == Some(&b'\n'))
    .then_some((n, i + 2))
}

/// A bulk header `$N\r\n` at the start of `buf`: `(N, header bytes)`. A
/// length over [`BULK_BYTES_MAX`] is an error, as in Redis.
#[inline]
pub fn bulk_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    if buf.first() == Some(&b'$')
        && let Some(h) = short_header(buf)
    {
        return if h.0 <= BULK_BYTES_MAX {
            Ok(Some(h))
        } else {
            Err(ProtocolError::BulkLength)
        };
    }
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'$' {
        return Err(ProtocolError::BulkLength);
    }
    match header(buf, ProtocolError::BulkLength)? {
        None => Ok(None),
        Some((n, used)) if n >= 0 && n as u64 <= BULK_BYTES_MAX as u64 => {
            Ok(Some((n as usize, used)))
        }
        Some(_) => Err(ProtocolError::BulkLength),
    }
}

/// Where the parse of a frame stopped, incomplete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// An array frame: its argument count, the argument it was reading and
    /// that argument's offset in the frame. The arguments before it are in
    /// `args` already.
    Array {
        count: usize,
        next: usize,
        pos: usize,
    },
    /// An inline command: its first `scanned` bytes hold no newline.
    Inline { scanned: usize },
}

/// Parse one command from the front of `buf`, its argument ranges into
/// `args` (cleared first).
#[cfg(test)]
pub fn parse(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    parse_resuming(buf, args, None)
}

/// [`parse`], going on from `resume`: what an earlier parse of the same
/// frame (the front of `buf`, with more bytes now) returned as
/// incomplete, with `args` as that parse left it.
pub fn parse_resuming(buf: &[u8], args: &mut Vec<Range<usize>>, resume: Option<Resume>) -> Parsed {
    match resume {
        Some(Resume::Array { count, next, pos }) => {
            debug_assert!(args.len() >= next);
            args.truncate(next);
            return array_args(buf, args, count, next, pos);
        }
        Some(Resume::Inline { scanned }) => {
            args.clear();
            return parse_inline(buf, args, scanned);
        }
        None => {}
    }
    args.clear();
    match buf.first() {
        None => Parsed::Incomplete { resume: None },
        Some(b'*') => parse_array(buf, args),
        Some(_) => parse_inline(buf, args, 0),
    }
}

fn parse_array(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    let head = match short_header(buf) {
        Some((n, used)) => Ok(Some((n.min(i64::MAX as usize) as i64, used))),
        None => header(buf, ProtocolError::MultibulkLength),
    };
    let (count, pos) = match head {
        Err(e) => return Parsed::Error(e),
        Ok(None) => return Parsed::Incomplete { resume: None },
        Ok(Some(h)) => h,
    };
    if count > ARGS_MAX as i64 {
        return Parsed::Error(ProtocolError::MultibulkLength);
    }
    // `*0` and `*-1` are empty commands, as Redis treats them.
    array_args(buf, args, count.max(0) as usize, 0, pos)
}

/// The arguments of an array frame of `count`, from argument `from` at
/// byte `pos` on.
fn array_args(
    buf: &[u8],
    args: &mut Vec<Range<usize>>,
    count: usize,
    from: usize,
    mut pos: usize,
) -> Parsed {
    for i in from..count {
        let resume = Resume::Array {
            count,
            next: i,
            pos,
        };
        let (len, used) = match bulk_header(&buf[pos..]) {
            Err(e) => return Parsed::Error(e),
            Ok(None) => return incomplete(pos, resume),
            Ok(Some(h)) => h,
        };
        if len > ARG_BYTES_MAX {
            return Parsed::Oversize {
                consumed: pos + used,
                arg_bytes: len,
                skip_bytes: len,
                skip_args: count - i - 1,
            };
        }
        let start = pos + used;
        if buf.len() < start + len + 2 {
            return incomplete(start + len + 2, resume);
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error(ProtocolError::MissingCrlf);
        }
        args.push(start..start + len);
        pos = start + len + 2;
    }
    // Whole, the limit holds as it does for a frame that came in pieces.
    if pos > FRAME_BYTES_MAX {
        return Parsed::Error(ProtocolError::FrameTooLong);
    }
    Parsed::Command { consumed: pos }
}

/// Incomplete, to go on from `resume`, unless the frame already needs more
/// than the limit: it reaches at least byte `reaches`.
fn incomplete(reaches: usize, resume: Resume) -> Parsed {
    if reaches > FRAME_BYTES_MAX {
        Parsed::Error(ProtocolError::FrameTooLong)
    } else {
        Parsed::Incomplete {
            resume: Some(resume),
        }
    }
}

/// An inline command, whose first `scanned` bytes hold no newline. Its
/// line holds at most [`INLINE_BYTES_MAX`] bytes before its `\r\n` (or
/// `\n`).
fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>, scanned: usize) -> Parsed {
    let limit = buf.len().min(INLINE_BYTES_MAX + 2);
    let Some(nl) = buf[scanned.min(limit)..limit]
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| scanned.min(limit) + p)
    else {
        return if buf.len() >= INLINE_BYTES_MAX + 2 {
            Parsed::Error(ProtocolError::InlineTooLong)
        } else {
            Parsed::Incomplete {
                resume: Some(Resume::Inline { scanned: buf.len() }),
            }
        };
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    if line_end > INLINE_BYTES_MAX {
        return Parsed::Error(ProtocolError::InlineTooLong);
    }
    // Split as Redis's `sdssplitargs` does, which reads the line as a C
    // string: a NUL byte ends it.
    let line = &buf[..line_end];
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    if line.iter().any(|&b| b == b'"' || b == b'\'') {
        return Parsed::Quoted {
            consumed: nl + 1,
            line: line.len(),
        };
    }
    let mut i = 0;
    while i < line.len() {
        if is_space(line[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && !ends_word(line[i]) {
            i += 1;
        }
        if args.len() == ARGS_MAX {
            return Parsed::Error(ProtocolError::MultibulkLength);
        }
        args.push(start..i);
    }
    Parsed::Command { consumed: nl + 1 }
}

/// C's `isspace`: what Redis skips between an inline command's arguments.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What ends an unquoted argument in Redis (not vertical tab or form feed,
/// which are part of it).
fn ends_word(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The arguments of an inline command with quotes, the first `line` bytes
/// of which [`Parsed::Quoted`] told: unescaped into `owned`, their ranges
/// (in `owned`) into `args`. As Redis's `sdssplitargs` splits them: in
/// double quotes `\xHH` is a byte and `\n`, `\r`, `\t`, `\b`, `\a` what
/// C means by them (a backslash before anything else stands for that
/// byte); in single quotes only `\'` is an escape; a quote may open in the
/// middle of an argument, but a closing one must end it.
pub fn unquote(
    line: &[u8],
    args: &mut Vec<Range<usize>>,
    owned: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    args.clear();
    owned.clear();
    let at = |i: usize| line.get(i).copied();
    let mut i = 0;
    loop {
        while at(i).is_some_and(is_space) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(());
        }
        let start = owned.len();
        // The quote open, if any.
        let mut quote = None;
        loop {
            let Some(b) = at(i) else {
                if quote.is_some() {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                break;
            };
            let next = at(i + 1);
            match quote {
                Some(q) if b == q => {
                    if next.is_some_and(|c| !is_space(c)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                Some(b'"') if b == b'\\' && next.is_some() => {
                    let hex = |k| at(k).and_then(|d: u8| (d as char).to_digit(16));
                    if let (Some(b'x'), Some(h), Some(l)) = (next, hex(i + 2), hex(i + 3)) {
                        owned.push((h * 16 + l) as u8);
                        i += 2;
                    } else {
                        owned.push(match next {
                            Some(b'n') => b'\n',
                            Some(b'r') => b'\r',
                            Some(b't') => b'\t',
                            Some(b'b') => 0x08,
                            Some(b'a') => 0x07,
                            c => c.unwrap_or(b),
                        });
                    }
                    i += 1;
                }
                Some(_) if b == b'\\' && next == Some(b'\'') => {
                    owned.push(b'\'');
                    i += 1;
                }
                Some(_) => owned.push(b),
                None if ends_word(b) => break,
                None if b == b'"' || b == b'\'' => quote = Some(b),
                None => owned.push(b),
            }
            i += 1;
        }
        if args.len() == ARGS_MAX {
            return Err(ProtocolError::MultibulkLength);
        }
        args.push(start..owned.len());
    }
}

// ------------------------------------------------------------------ replies

pub fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

pub fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Longest `<prefix><i64>\r\n` line: prefix, sign, 19 digits, CRLF.
const LINE_BYTES_MAX: usize = 23;

/// The line `<prefix><n>\r\n`, built right to left in a stack buffer:
/// the buffer and where the line starts in it.
#[inline]
fn line(prefix: u8, n: i64) -> ([u8; LINE_BYTES_MAX], usize) {
    let mut b = [0u8; LINE_BYTES_MAX];
    let mut i = LINE_BYTES_MAX - 2;
    b[i] = b'\r';
    b[i + 1] = b'\n';
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        b[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        b[i] = b'-';
    }
    i -= 1;
    b[i] = prefix;
    (b, i)
}

#[inline]
fn push_line(out: &mut Vec<u8>, prefix: u8, n: i64) {
    let (b, start) = line(prefix, n);
    out.extend_from_slice(&b[start..]);
}

pub fn int(out: &mut Vec<u8>, n: i64) {
    push_line(out, b':', n);
}

/// A bulk string reply: one reservation, three copies.
#[inline]
pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    let (b, start) = line(b'$', data.len() as i64);
    out.reserve(LINE_BYTES_MAX + data.len() + 2);
    out.extend_from_slice(&b[start..]);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub fn array_len(out: &mut Vec<u8>, len: usize) {
    push_line(out, b'*', len as i64);
}

/// An error reply; `msg` starts with its code (`ERR ...`). Line breaks in
/// it become spaces so the reply stays one line.
pub fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, nothing around it.
pub fn decimal(out: &mut Vec<u8>, n: i64) {
    let (b, start) = line(b' ', n);
    out.extend_from_slice(&b[start + 1..LINE_BYTES_MAX - 2]);
}

/// The value of an integer reply `:N\r\n`.
pub fn int_of(reply: &[u8]) -> Option<i64> {
    let body = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// A decimal integer argument, as Redis reads them (`string2ll`): an
/// optional `-`, then `0` alone or digits from a first one of 1 to 9 (no
/// spaces, no `+`, no leading zero, no `-0`), within `i64`.
pub fn parse_i64(arg: &[u8]) -> Option<i64> {
    let (negative, digits) = match arg.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, arg),
    };
    match digits {
        [b'0'] if !negative => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut n: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        let d = i64::from(b - b'0');
        n = n.checked_mul(10)?;
        n = if negative {
            n.checked_sub(d)?
        } else {
            n.checked_add(d)?
        };
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame cut anywhere is incomplete; parsed again from where it
    /// stopped, a byte more at a time as a trickling client sends it, it
    /// gives what a parse of the whole gives (an array frame and an inline
    /// command alike). A bad byte after a cut is found by the parse that
    /// goes on.
    #[test]
    fn an_incomplete_frame_goes_on_from_where_it_stopped() {
        let array = b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n$0\r\n\r\n";
        for frame in [&array[..], &b"SET k  value\r\n"[..]] {
            let mut whole = Vec::new();
            let want = parse(frame, &mut whole);
            assert_eq!(
                want,
                Parsed::Command {
                    consumed: frame.len()
                }
            );
            let mut args = Vec::new();
            for cut in 0..frame.len() {
                let Parsed::Incomplete { mut resume } = parse(&frame[..cut], &mut args) else {
                    panic!("cut {cut}");
                };
                for more in cut + 1..frame.len() {
                    match parse_resuming(&frame[..more], &mut args, resume) {
                        Parsed::Incomplete { resume: r } => resume = r,
                        other => panic!("cut {cut}, {more}: {other:?}"),
                    }
                }
                assert_eq!(parse_resuming(frame, &mut args, resume), want, "cut {cut}");
                assert_eq!(args, whole, "cut {cut}");
            }
        }
        let mut args = Vec::new();
        let mut bad = array[..20].to_vec();
        let Parsed::Incomplete { resume } = parse(&bad, &mut args) else {
            panic!("incomplete")
        };
        assert!(resume.is_some());
        bad.extend_from_slice(b"GARBAGE\r\n");
        assert!(matches!(
            parse_resuming(&bad, &mut args, resume),
            Parsed::Error(_)
        ));
        // An inline line past the limit, trickled, is refused once it is.
        let mut line = vec![b'a'; INLINE_BYTES_MAX + 1];
        let Parsed::Incomplete { resume } = parse(&line, &mut args) else {
            panic!("incomplete")
        };
        line.push(b'a');
        assert_eq!(
            parse_resuming(&line, &mut args, resume),
            Parsed::Error(ProtocolError::InlineTooLong)
        );
        // A line of exactly the limit is a command, with either ending;
        // one byte more is refused with either.
        for end in [&b"\r\n"[..], b"\n"] {
            let mut line = b"ECHO ".to_vec();
            line.resize(INLINE_BYTES_MAX, b'a');
            line.extend_from_slice(end);
            let n = line.len();
            assert_eq!(parse(&line, &mut args), Parsed::Command { consumed: n });
            line.insert(5, b'a');
            assert_eq!(
                parse(&line, &mut args),
                Parsed::Error(ProtocolError::InlineTooLong)
            );
        }
    }

    /// Inline commands are split as Redis splits them: each case's
    /// arguments are what redis-server 7.0.15 echoes for it, or its
    /// protocol error.
    #[test]
    fn inline_commands_are_split_as_redis_splits_them() {
        let split = |line: &[u8]| -> Result<Vec<Vec<u8>>, ProtocolError> {
            let mut buf = line.to_vec();
            buf.extend_from_slice(b"\r\n");
            let mut args = Vec::new();
            let mut owned = Vec::new();
            let bytes = match parse(&buf, &mut args) {
                Parsed::Command { consumed } => {
                    assert_eq!(consumed, buf.len());
                    &buf[..]
                }
                Parsed::Quoted { consumed, line } => {
                    assert_eq!(consumed, buf.len());
                    unquote(&buf[..line], &mut args, &mut owned)?;
                    &owned[..]
                }
                other => panic!("{other:?}"),
            };
            Ok(args.iter().map(|r| bytes[r.clone()].to_vec()).collect())
        };
        let cases: [(&[u8], &[&[u8]]); 12] = [
            (b"SET k  value", &[b"SET", b"k", b"value"]),
            (b" \x0b\x0cECHO a\x0bb\tc", &[b"ECHO", b"a\x0bb", b"c"]),
            (b"ECHO a\x0cb", &[b"ECHO", b"a\x0cb"]),
            (b"ECHO \"a b\"", &[b"ECHO", b"a b"]),
            (b"ECHO \"\"", &[b"ECHO", b""]),
            (
                b"ECHO \"\\x41\\x4a\\xZZ\\n\\q\\\"\\\\\"",
                &[b"ECHO", b"AJxZZ\nq\"\\"],
            ),
            (b"ECHO \"\\r\\t\\b\\a\"", &[b"ECHO", b"\r\t\x08\x07"]),
            (b"ECHO 'it\\'s \\n \"x\"'", &[b"ECHO", b"it's \\n \"x\""]),
            (b"ECHO a\"b c\" d'e'", &[b"ECHO", b"ab c", b"de"]),
            (b"ECHO back\\slash", &[b"ECHO", b"back\\slash"]),
            // A NUL ends the line, as `sdssplitargs` reads it.
            (b"ECHO a\0b c", &[b"ECHO", b"a"]),
            (b"ECHO 'a b'\0'", &[b"ECHO", b"a b"]),
        ];
        for (line, want) in cases {
            let got = split(line).unwrap_or_else(|e| panic!("{line:?}: {e:?}"));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(line));
        }
        for bad in [
            &b"ECHO a\\\"b"[..],
            b"ECHO \"abc",
            b"ECHO \"a\"b",
            b"ECHO 'a'b",
            b"ECHO 'abc",
            b"ECHO \"a\\\"",
            b"ECHO \"a\\",
        ] {
            assert_eq!(
                split(bad),
                Err(ProtocolError::UnbalancedQuotes),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A frame longer than the limit is refused whether its bytes came at
    /// once or in pieces.
    #[test]
    fn the_frame_limit_holds_however_the_bytes_arrive() {
        let arg = vec![b'v'; 1 << 20];
        let n = FRAME_BYTES_MAX / arg.len() + 1;
        let mut frame = format!("*{n}\r\n").into_bytes();
        for _ in 0..n {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(&arg);
            frame.extend_from_slice(b"\r\n");
        }
        let mut args = Vec::new();
        let whole = parse(&frame, &mut args);
        assert_eq!(whole, Parsed::Error(ProtocolError::FrameTooLong));
        let mut resume = None;
        let mut got = None;
        for cut in (1..frame.len()).step_by(64 << 10).chain([frame.len()]) {
            match parse_resuming(&frame[..cut], &mut args, resume) {
                Parsed::Incomplete { resume: r } => resume = r,
                other => {
                    got = Some(other);
                    break;
                }
            }
        }
        assert_eq!(got, Some(Parsed::Error(ProtocolError::FrameTooLong)));
    }

    /// Integers as Redis's `string2ll` reads them: what it refuses is
    /// refused here too (`INCR` of `007` is an error in Redis).
    #[test]
    fn integers_are_read_as_redis_reads_them() {
        for (s, v) in [
            ("0", Some(0)),
            ("7", Some(7)),
            ("-7", Some(-7)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("007", None),
            ("00", None),
            ("-0", None),
            ("+1", None),
            ("", None),
            ("-", None),
            (" 1", None),
            ("1 ", None),
            ("1x", None),
        ] {
            assert_eq!(parse_i64(s.as_bytes()), v, "{s:?}");
        }
    }

    /// `*N` and `$N` headers with a sign or a leading zero are protocol
    /// errors, as in Redis; `*-1`, `*0` and `$0` are not.
    #[test]
    fn headers_with_a_sign_or_a_leading_zero_are_refused() {
        let mut args = Vec::new();
        let cases: [(&[u8], ProtocolError); 6] = [
            (b"*+1\r\n$4\r\nPING\r\n", ProtocolError::MultibulkLength),
            (b"*01\r\n$4\r\nPING\r\n", ProtocolError::MultibulkLength),
            (b"*-0\r\n", ProtocolError::MultibulkLength),
            (b"*1\r\n$+4\r\nPING\r\n", ProtocolError::BulkLength),
            (b"*1\r\n$04\r\nPING\r\n", ProtocolError::BulkLength),
            (b"*1\r\n$-0\r\n", ProtocolError::BulkLength),
        ];
        for (bad, e) in cases {
            assert_eq!(
                parse(bad, &mut args),
                Parsed::Error(e),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"*-1\r\n", &mut args),
            Parsed::Command { consumed: 5 }
        );
        assert_eq!(parse(b"*0\r\n", &mut args), Parsed::Command { consumed: 4 });
        assert_eq!(
            parse(b"*1\r\n$0\r\n\r\n", &mut args),
            Parsed::Command { consumed: 10 }
        );
        assert_eq!(args, vec![8..8]);
        assert_eq!(
            parse(b"*1\r\n$10\r\n0123456789\r\n", &mut args),
            Parsed::Command { consumed: 21 }
        );
    }

    /// A bulk length past Redis's `proto-max-bulk-len` is answered at once
    /// instead of being skipped byte by byte.
    #[test]
    fn a_huge_bulk_length_is_an_error_at_once() {
        let mut args = Vec::new();
        assert_eq!(
            parse(b"*2\r\n$4\r\nECHO\r\n$9999999999999\r\n", &mut args),
            Parsed::Error(ProtocolError::BulkLength)
        );
        let at_limit = format!("*2\r\n$4\r\nECHO\r\n${BULK_BYTES_MAX}\r\n");
        assert!(matches!(
            parse(at_limit.as_bytes(), &mut args),
            Parsed::Oversize {
                arg_bytes: BULK_BYTES_MAX,
                ..
            }
        ));
        let over = format!("${}\r\n", BULK_BYTES_MAX + 1);
        assert_eq!(bulk_header(over.as_bytes()), Err(ProtocolError::BulkLength));
    }
}
