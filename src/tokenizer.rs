//! The RWKV "World" tokenizer (`rwkv_vocab_v20230424.txt`).
//!
//! Encoding is greedy longest match over the UTF-8 bytes, left to right, exactly as the
//! official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` does it. The vocabulary is held in a
//! double-array trie: one transition is `t = base[node] + byte`, valid when
//! `check[t] == node`, so each input byte costs one array lookup and no search.
//!
//! Id 0 is end-of-text and has no line in the vocabulary. Here it decodes to no bytes
//! (the official `decodeBytes` raises `KeyError` on it, and its `decode` swallows that
//! and returns "\u{FFFD}"). Encoding never produces 0.

use std::collections::VecDeque;
use std::path::Path;

use crate::error::{Error, Result};

/// Ids above this are taken as a corrupt line rather than allocating a huge table.
const MAX_ID: u32 = 1 << 24;
/// `check` of a cell that belongs to no node.
const FREE: u32 = u32::MAX;
/// `check` of the root cell (index 0): equal to no node index.
const ROOT: u32 = u32::MAX - 1;

#[derive(Clone, Copy, Debug)]
struct Cell {
    /// Children of this node live at `base + byte`.
    base: u32,
    /// The parent node's index, `FREE` or `ROOT`.
    check: u32,
    /// The token that ends at this node, 0 if none.
    id: u32,
}

const FREE_CELL: Cell = Cell { base: 0, check: FREE, id: 0 };

#[derive(Clone)]
pub struct Tokenizer {
    cells: Vec<Cell>,
    /// All token bytes back to back; `spans[id]` is the token's range in it.
    bytes: Vec<u8>,
    spans: Vec<Option<(u32, u32)>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer {{ vocab_size: {} }}", self.vocab_size())
    }
}

/// The World vocabulary file is about 1 MB; one 64 times that is not a vocabulary.
const MAX_VOCAB_FILE_BYTES: u64 = 64 << 20;

impl Tokenizer {
    pub fn from_vocab_file(path: &Path) -> Result<Tokenizer> {
        let raw = crate::loader::bytes::read_small(path, MAX_VOCAB_FILE_BYTES, "a vocabulary file")?;
        let text = String::from_utf8(raw).map_err(|e| Error::load(path, format!("not UTF-8: {e}")))?;
        Self::from_vocab_text(&text, path)
    }

    /// Parses `ID REPR LEN` lines (CRLF or LF; blank lines skipped). REPR is a Python
    /// str or bytes literal; a str is UTF-8 encoded, as the official loader does.
    /// Rejected, with the line number: a malformed line or literal, an escape Python
    /// would not accept quietly, LEN not the byte length, id 0 (reserved), an empty
    /// token, a repeated id or repeated bytes, and a vocabulary lacking one of the 256
    /// single-byte tokens (without them some inputs could not be encoded).
    pub fn from_vocab_text(text: &str, origin: &Path) -> Result<Tokenizer> {
        let mut tokens: Vec<(u32, Vec<u8>, usize)> = Vec::new(); // (id, bytes, line)
        for (n, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: &str| Error::load(origin, format!("line {}: {msg}: {line:?}", n + 1));
            let (id, rest) = line.split_once(' ').ok_or_else(|| bad("expected `ID REPR LEN`"))?;
            let (repr, len) = rest.rsplit_once(' ').ok_or_else(|| bad("expected `ID REPR LEN`"))?;
            let id = parse_number(id).ok_or_else(|| bad("bad id"))?;
            let len = parse_number(len).ok_or_else(|| bad("bad LEN"))?;
            let bytes = parse_literal(repr).map_err(|e| bad(&e))?;
            if id == 0 || id > MAX_ID {
                return Err(bad("id must be in 1..=2^24 (0 is end of text)"));
            }
            if bytes.is_empty() || bytes.len() != len as usize {
                return Err(bad(&format!("token is {} bytes long", bytes.len())));
            }
            tokens.push((id, bytes, n + 1));
        }
        Self::build(tokens, origin)
    }

    fn build(mut tokens: Vec<(u32, Vec<u8>, usize)>, origin: &Path) -> Result<Tokenizer> {
        let max_id = tokens.iter().map(|t| t.0).max().unwrap_or(0);
        let mut spans = vec![None; max_id as usize + 1];
        let mut bytes = Vec::with_capacity(tokens.iter().map(|t| t.1.len()).sum());
        for (id, b, line) in &tokens {
            if spans[*id as usize].is_some() {
                return Err(Error::load(origin, format!("line {line}: id {id} appears twice")));
            }
            spans[*id as usize] = Some((bytes.len() as u32, (bytes.len() + b.len()) as u32));
            bytes.extend_from_slice(b);
        }
        spans[0] = Some((0, 0)); // end of text: no bytes
        tokens.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        for w in tokens.windows(2) {
            if w[0].1 == w[1].1 {
                let (a, b) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
                let msg = format!("line {b}: same bytes as line {a}");
                return Err(Error::load(origin, msg));
            }
        }
        let mut single = [false; 256];
        for t in tokens.iter().filter(|t| t.1.len() == 1) {
            single[t.1[0] as usize] = true;
        }
        if let Some(b) = single.iter().position(|&s| !s) {
            return Err(Error::load(origin, format!("no single-byte token for byte 0x{b:02x}")));
        }
        let keys: Vec<(u32, &[u8])> = tokens.iter().map(|t| (t.0, &t.1[..])).collect();
        Ok(Tokenizer { cells: build_double_array(&keys), bytes, spans })
    }

    /// Each text encoded as `encode` does, on all cores.
    pub fn encode_batch<T: AsRef<[u8]> + Sync>(&self, texts: &[T]) -> Vec<Vec<u32>> {
        let threads = crate::parallel::cores().min(texts.len()).max(1);
        let parts = texts.chunks(texts.len().div_ceil(threads).max(1)).collect();
        let encoded = crate::parallel::map(parts, threads, |part: &[T]| {
            part.iter().map(|text| self.encode(text.as_ref())).collect::<Vec<_>>()
        });
        encoded.into_iter().flatten().collect()
    }

    /// Greedy longest match, left to right. Total: every byte is a token.
    pub fn encode(&self, text: &[u8]) -> Vec<u32> {
        let cells = &self.cells[..];
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut pos = 0;
        while pos < text.len() {
            let (mut node, mut base) = (0u32, cells[0].base);
            let (mut best_id, mut best_end) = (0, pos + 1);
            for (i, &b) in text[pos..].iter().enumerate() {
                let t = base as usize + b as usize;
                let cell = cells[t]; // in bounds: the array is padded by 256 past every base
                if cell.check != node {
                    break;
                }
                if cell.id != 0 {
                    (best_id, best_end) = (cell.id, pos + i + 1);
                }
                (node, base) = (t as u32, cell.base);
            }
            out.push(best_id);
            pos = best_end;
        }
        out
    }

    /// Concatenated token bytes. Id 0 gives nothing; an id outside the vocabulary is an
    /// `Error::Shape` naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (position, &id) in ids.iter().enumerate() {
            out.extend_from_slice(self.bytes_of(id, Some(position))?);
        }
        Ok(out)
    }

    /// Largest id + 1 (65530 for the World vocabulary; models pad their embedding to
    /// 65536 rows, and ids 65530..65536 have no text).
    pub fn vocab_size(&self) -> usize {
        self.spans.len()
    }

    /// The token's bytes; `Some(b"")` for 0 (end of text), `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let (s, e) = (*self.spans.get(id as usize)?)?;
        Some(&self.bytes[s as usize..e as usize])
    }

    fn bytes_of(&self, id: u32, position: Option<usize>) -> Result<&[u8]> {
        if let Some(bytes) = self.token_bytes(id) {
            return Ok(bytes);
        }
        if id as usize >= self.vocab_size() {
            return Err(Error::token_out_of_range(id, position, self.vocab_size()));
        }
        // A hole in a vocabulary file's ids: in range, but no token has it.
        let at = position.map(|p| format!(" at position {p}")).unwrap_or_default();
        Err(Error::Shape(format!("token id {id}{at} has no token in the vocabulary")))
    }
}

/// Lays out the trie of the sorted, distinct, non-empty `keys` as a double array, breadth
/// first so the hot upper levels sit together at the front.
fn build_double_array(keys: &[(u32, &[u8])]) -> Vec<Cell> {
    let mut cells = vec![Cell { base: 0, check: ROOT, id: 0 }];
    cells.resize(256, FREE_CELL);
    let (mut first_free, mut hints) = (1, [0; 257]);
    // A node: its cell, and the keys [lo, hi) that start with its `depth`-byte prefix.
    let mut queue = VecDeque::from([(0usize, 0usize, keys.len(), 0usize)]);
    let (mut labels, mut ranges) = (Vec::new(), Vec::new());
    while let Some((cell, mut lo, hi, depth)) = queue.pop_front() {
        if lo < hi && keys[lo].1.len() == depth {
            cells[cell].id = keys[lo].0; // sorted: the prefix itself comes first
            lo += 1;
        }
        labels.clear();
        ranges.clear();
        while lo < hi {
            let c = keys[lo].1[depth];
            let start = lo;
            while lo < hi && keys[lo].1[depth] == c {
                lo += 1;
            }
            labels.push(c);
            ranges.push((start, lo));
        }
        if labels.is_empty() {
            continue; // leaf: base 0 is safe, since no cell's check names this node
        }
        let base = find_base(&mut cells, &mut first_free, &mut hints, &labels);
        cells[cell].base = base as u32;
        for (&c, &(s, e)) in labels.iter().zip(&ranges) {
            cells[base + c as usize].check = cell as u32;
            queue.push_back((base + c as usize, s, e, depth + 1));
        }
    }
    cells
}

/// The first base at or after the search start where every child label lands on a free
/// cell. Cells only ever fill up, so a node with k children resumes where the last
/// k-child node was placed (`hints[k]`) instead of rescanning the crowded front: this
/// keeps the build linear-ish (~15 ms for the World vocabulary) at the cost of ~3% more cells.
/// Grows the array so that `base + 255` stays in bounds (encode relies on that).
fn find_base(
    cells: &mut Vec<Cell>,
    first_free: &mut usize,
    hints: &mut [usize; 257],
    labels: &[u8],
) -> usize {
    while *first_free < cells.len() && cells[*first_free].check != FREE {
        *first_free += 1;
    }
    let (c0, k) = (labels[0] as usize, labels.len());
    let start = (*first_free).max(c0).max(if k > 1 { hints[k] } else { 0 });
    for p in start.. {
        if cells.len() < p + 256 {
            cells.resize(p + 256, FREE_CELL);
        }
        let base = p - c0;
        if cells[p].check == FREE && labels[1..].iter().all(|&c| cells[base + c as usize].check == FREE) {
            hints[k] = p;
            return base;
        }
    }
    unreachable!("the search runs on until it fits")
}

fn parse_number(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The bytes of one Python literal (`'..'`, `".."`, `b'..'`, `b".."`), a str UTF-8
/// encoded. Escapes: \\ \' \" \n \r \t \a \b \f \v, octal \ooo, \xhh and, in a str,
/// \uhhhh and \Uhhhhhhhh. Unknown escapes (which Python keeps with a warning), \N{..}
/// and surrogates (which `.encode("utf-8")` refuses) are errors.
fn parse_literal(repr: &str) -> std::result::Result<Vec<u8>, String> {
    let repr = repr.trim_start(); // as eval() does
    let (is_bytes, body) = match repr.strip_prefix(['b', 'B']) {
        Some(rest) => (true, rest),
        None => (false, repr),
    };
    let quote = match body.chars().next() {
        Some(q @ ('\'' | '"')) => q,
        _ => return Err("REPR is not a quoted literal".into()),
    };
    let inner = match body[1..].strip_suffix(quote) {
        Some(inner) => inner,
        None => return Err("unterminated literal".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == quote {
            return Err("unescaped quote inside the literal".into());
        }
        if ch != '\\' {
            if is_bytes && !ch.is_ascii() {
                return Err("non-ASCII character in a bytes literal".into());
            }
            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
            continue;
        }
        let e = chars.next().ok_or("literal ends in a lone backslash")?;
        let mut hex = |n: usize| -> std::result::Result<u32, String> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            match u32::from_str_radix(&digits, 16) {
                Ok(v) if digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(v),
                _ => Err(format!("bad \\{e} escape")),
            }
        };
        let value = match e {
            '\\' | '\'' | '"' => e as u32,
            'n' => 10,
            'r' => 13,
            't' => 9,
            'a' => 7,
            'b' => 8,
            'f' => 12,
            'v' => 11,
            'x' => hex(2)?,
            'u' if !is_bytes => hex(4)?,
            'U' if !is_bytes => hex(8)?,
            '0'..='7' => {
                let mut v = e as u32 - '0' as u32;
                for _ in 0..2 {
                    match chars.peek() {
                        Some(&d @ '0'..='7') => {
                            v = v * 8 + (d as u32 - '0' as u32);
                            chars.next();
                        }
                        _ => break,
                    }
                }
                v
            }
            _ => return Err(format!("unsupported escape \\{e}")),
        };
        if is_bytes {
            out.push(u8::try_from(value).map_err(|_| "octal escape above \\377 in bytes")?);
        } else {
            let c =
                char::from_u32(value).ok_or_else(|| format!("escape U+{value:X} is not a scalar value"))?;
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
    Ok(out)
}

/// Turns a stream of ids into text, emitting only whole characters.
///
/// Bytes that end in an incomplete but still possible UTF-8 sequence (at most 3) are held
/// back until a later token completes it. Bytes that can never become valid are emitted
/// at once as U+FFFD, one per maximal invalid subpart: the same rule as Python's
/// `errors="replace"` and `String::from_utf8_lossy`, so the concatenation of all
/// `push` results and `finish` equals the lossy decoding of all the bytes at once.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the token's bytes and returns the text completed by them (maybe empty).
    /// An unknown id is an `Error::Shape` and leaves the decoder unchanged.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend_from_slice(tok.bytes_of(id, None)?);
        Ok(self.drain(false))
    }

    /// Ends the stream: a held-back incomplete sequence becomes U+FFFD. The decoder is
    /// empty afterwards and can be reused.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        let mut rest = &self.pending[..];
        while !rest.is_empty() {
            let err = match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(err) => err,
            };
            let (valid, after) = rest.split_at(err.valid_up_to());
            out.push_str(std::str::from_utf8(valid).expect("checked by valid_up_to"));
            rest = after;
            match err.error_len() {
                Some(n) => rest = &rest[n..],
                None if !at_end => break, // incomplete: wait for more bytes
                None => rest = &[],
            }
            out.push('\u{FFFD}');
        }
        let done = self.pending.len() - rest.len();
        self.pending.drain(..done);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::OnceLock;

    fn world() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/rwkv_gpu/rwkv_vocab_v20230424.txt");
            Tokenizer::from_vocab_file(&path).unwrap()
        })
    }

    /// xorshift64: deterministic pseudo-random numbers without a dependency.
    fn rng(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Just enough JSON for tests/data/tokenizer_cases.json: [{"text": "..", "ids": [..]}, ..].
    fn golden_cases() -> Vec<(String, Vec<u32>)> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer_cases.json");
        let src = std::fs::read_to_string(path).unwrap();
        let mut it = src.chars().peekable();
        let hex = |it: &mut dyn Iterator<Item = char>| {
            u32::from_str_radix(&it.take(4).collect::<String>(), 16).unwrap()
        };
        let (mut cases, mut text, mut ids) = (Vec::new(), String::new(), Vec::new());
        while let Some(c) = it.next() {
            match c {
                '"' => {
                    let mut s = String::new();
                    while let Some(c) = it.next().filter(|&c| c != '"') {
                        s.push(match c {
                            '\\' => match it.next().unwrap() {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                'u' => match hex(&mut it) {
                                    hi @ 0xD800..0xDC00 => {
                                        it.nth(1); // the `\u` of the low surrogate
                                        char::from_u32(
                                            0x10000 + ((hi - 0xD800) << 10) + hex(&mut it) - 0xDC00,
                                        )
                                        .unwrap()
                                    }
                                    v => char::from_u32(v).unwrap(),
                                },
                                e @ ('"' | '\\' | '/') => e,
                                e => panic!("escape \\{e} not handled"),
                            },
                            c => c,
                        });
                    }
                    if it.peek() != Some(&':') {
                        text = s; // a value, not a key
                    }
                }
                '0'..='9' => {
                    let mut n = c.to_digit(10).unwrap();
                    while let Some(d) = it.next_if(char::is_ascii_digit) {
                        n = n * 10 + d.to_digit(10).unwrap();
                    }
                    ids.push(n);
                }
                '}' => cases.push((std::mem::take(&mut text), std::mem::take(&mut ids))),
                _ => {}
            }
        }
        cases
    }

    #[test]
    fn golden_cases_match_the_official_tokenizer() {
        let cases = golden_cases();
        assert!(cases.len() >= 20 && cases.iter().any(|c| c.0.contains('😀')));
        for (text, ids) in cases {
            assert_eq!(world().encode(text.as_bytes()), ids, "{text:?}");
            assert_eq!(world().decode_bytes(&ids).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn a_batch_encodes_as_one_text_at_a_time() {
        // The golden texts, an empty one, and a batch of one: in order, none lost.
        let mut texts: Vec<String> = golden_cases().into_iter().map(|c| c.0).collect();
        texts.push(String::new());
        let one_by_one: Vec<Vec<u32>> = texts.iter().map(|t| world().encode(t.as_bytes())).collect();
        assert_eq!(world().encode_batch(&texts), one_by_one);
        assert_eq!(world().encode_batch(&texts[..1]), one_by_one[..1]);
        assert!(world().encode_batch::<String>(&[]).is_empty());
    }

    #[test]
    fn vocab_file_literals() {
        let t = world();
        assert_eq!(t.vocab_size(), 65530);
        assert_eq!(t.token_bytes(0), Some(&b""[..]));
        assert_eq!(t.token_bytes(1), Some(&b"\x00"[..]));
        assert_eq!(t.token_bytes(40), Some(&b"'"[..])); // "'"
        assert_eq!(t.token_bytes(93), Some(&b"\\"[..])); // '\\'
        assert_eq!(t.token_bytes(129), Some(&b"\x80"[..])); // b'\x80'
        assert_eq!(t.token_bytes(2423), Some(&b"\xc2\x80"[..])); // '\x80' is U+0080 in a str
        assert_eq!(t.token_bytes(9804), Some("\u{2002}".as_bytes())); // '\u2002'
        assert_eq!(t.token_bytes(65529), Some(&[b' '; 128][..]));
        assert_eq!(t.token_bytes(65530), None);
        assert_eq!(t.decode_bytes(&[33155, 0, 34]).unwrap(), b"Hello!");
        let err = t.decode_bytes(&[33155, 65533]).unwrap_err();
        let message = "token id 65533 at position 1 is out of range: the vocabulary has 65530 tokens";
        assert!(matches!(&err, Error::Shape(m) if m == message), "{err}");
        let err = StreamDecoder::new().push(t, 70000).unwrap_err();
        let message = "token id 70000 is out of range: the vocabulary has 65530 tokens";
        assert!(matches!(&err, Error::Shape(m) if m == message), "{err}");
    }

    #[test]
    fn an_id_missing_from_a_vocabulary_file_is_named_as_missing() {
        // The 256 single bytes as ids 1..=256, then one token at 300: ids 257..300 are holes.
        let mut text: String = (0..256).map(|b| format!("{} b'\\x{b:02x}' 1\n", b + 1)).collect();
        text.push_str("300 b'ab' 2\n");
        let t = Tokenizer::from_vocab_text(&text, Path::new("holes.txt")).unwrap();
        assert_eq!(t.vocab_size(), 301);
        let err = t.decode_bytes(&[98, 260]).unwrap_err();
        let message = "token id 260 at position 1 has no token in the vocabulary";
        assert!(matches!(&err, Error::Shape(m) if m == message), "{err}");
        assert_eq!(t.decode_bytes(&[300, 99]).unwrap(), b"abb"); // id b + 1 is byte b
        assert!(StreamDecoder::new().push(&t, 301).unwrap_err().to_string().contains("out of range"));
    }

    /// Encode against a brute-force longest match, and decode(encode(x)) == x.
    #[test]
    fn arbitrary_bytes_round_trip_and_match_brute_force() {
        let t = world();
        let by_bytes: HashMap<&[u8], u32> = (1..65530).map(|i| (t.token_bytes(i).unwrap(), i)).collect();
        let pieces: Vec<&[u8]> = by_bytes.keys().copied().collect();
        let mut next = rng(7);
        for round in 0..300 {
            let mut text = Vec::new();
            while text.len() < 400 {
                let p = pieces[next() as usize % pieces.len()];
                match next() % 4 {
                    0 => text.push(next() as u8),
                    1 => text.extend_from_slice(p),
                    _ => text.extend_from_slice(&p[..1 + next() as usize % p.len()]), // a token cut short
                }
            }
            if round % 50 == 0 {
                text.extend(std::iter::repeat_n(b' ', 300 + round));
            }
            let ids = t.encode(&text);
            assert_eq!(t.decode_bytes(&ids).unwrap(), text);
            let mut pos = 0;
            for &id in &ids {
                let longest = (1..=128.min(text.len() - pos))
                    .rev()
                    .find(|&n| by_bytes.contains_key(&text[pos..pos + n]));
                let n = longest.unwrap();
                assert_eq!(id, by_bytes[&text[pos..pos + n]], "round {round} at byte {pos}");
                pos += n;
            }
        }
        assert!(t.encode(b"").is_empty());
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let t = world();
        let text = "a👍🏽b你\u{0}é";
        // Single-byte tokens: the worst case, every character split across pushes.
        let ids: Vec<u32> = text.bytes().map(|b| t.encode(&[b])[0]).collect();
        let mut dec = StreamDecoder::new();
        let mut got = String::new();
        for (i, &id) in ids.iter().enumerate() {
            got += &dec.push(t, id).unwrap();
            assert!(text.as_bytes()[..=i].starts_with(got.as_bytes())); // never a U+FFFD or half a char
        }
        assert_eq!(got + &dec.finish(), text);
        assert!(dec.push(t, 70000).is_err());
        // Random tokens (many of them invalid UTF-8 fragments), however split, give the
        // same text as decoding all the bytes at once with replacement.
        let mut next = rng(3);
        for _ in 0..200 {
            let ids: Vec<u32> = (0..30).map(|_| 1 + (next() % 65529) as u32).collect();
            let mut got: String = ids.iter().map(|&id| dec.push(t, id).unwrap()).collect();
            got += &dec.finish();
            assert_eq!(got, String::from_utf8_lossy(&t.decode_bytes(&ids).unwrap()));
        }
        assert_eq!(dec.push(t, t.encode(b"\xf0")[0]).unwrap(), "");
        assert_eq!(dec.finish(), "\u{FFFD}"); // an incomplete sequence at the end
    }

    fn load(extra: &str) -> Result<Tokenizer> {
        let mut text: String = (0..256).map(|b| format!("{} b'\\x{b:02x}' 1\r\n", b + 1)).collect();
        text.push_str(extra);
        Tokenizer::from_vocab_text(&text, Path::new("test.txt"))
    }

    #[test]
    fn small_vocab_and_bad_lines() {
        let t = load("300 'ab' 2\n301 'abcd' 4\n302 \"\\u00e9\\t\" 3\n\n").unwrap();
        assert_eq!(t.vocab_size(), 303);
        assert_eq!(t.encode(b"abcabcdab"), vec![300, 100, 301, 300]);
        assert_eq!(t.token_bytes(302), Some(&b"\xc3\xa9\t"[..]));
        let bad = [
            "300 'ab' 3",       // wrong LEN
            "300 'ab'",         // no LEN
            "300 ab 2",         // not a literal
            "300 'a'b' 3",      // stray quote
            "300 'ab 2",        // unterminated
            "300 '\\' 1",       // escaped closing quote
            "300 '\\q' 2",      // unknown escape
            "300 '\\x4' 1",     // short \x
            "300 '\\ud800' 3",  // surrogate
            "300 b'\u{e9}' 2",  // non-ASCII in bytes
            "300 b'\\u00e9' 2", // \u in bytes
            "0 'ab' 2",         // id 0
            "x 'ab' 2",         // bad id
            "5 'ab' 2",         // repeated id
            "300 'a' 1",        // repeated bytes
            "300 '' 0",         // empty token
        ];
        for line in bad {
            let err = load(&format!("{line}\n")).unwrap_err();
            assert!(
                matches!(&err, Error::Load { message, .. } if message.contains("line 257")),
                "{line}: {err}"
            );
        }
        let missing: String = (1..256).map(|b| format!("{b} b'\\x{b:02x}' 1\n")).collect();
        let err = Tokenizer::from_vocab_text(&missing, Path::new("m.txt")).unwrap_err();
        assert!(err.to_string().contains("0x00"), "{err}");
    }
}
