//! LZString's `decompressFromBase64`, which older posthog-js uses for `compression=lz64`
//! bodies (`LZString.compressToBase64(JSON.stringify(events))` in a `data=` form field).
//!
//! Written here rather than taken from a crate because the output must be bounded while it is
//! produced: LZString's dictionary entries grow by one character per code, so a small body can
//! expand quadratically, and a decoder that returns only once it is done would let one request
//! take all the memory.

/// The alphabet of `compressToBase64`: standard base64, whose index is the 6-bit value.
const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LzStringError {
    #[error("not LZString base64: unexpected character {0:?}")]
    Alphabet(char),
    #[error("the LZString data ends before its end marker")]
    Truncated,
    #[error("the LZString data refers to a dictionary entry that does not exist")]
    BadReference,
    #[error("the LZString text is not valid UTF-16")]
    Utf16,
    #[error("decompressed to more than {limit} bytes")]
    TooLarge { limit: usize },
}

/// Decompresses `encoded` into the original text, failing as soon as the text would exceed
/// `limit` bytes (counted as UTF-16 code units times two, an upper bound of the UTF-8 size for
/// JSON, which is mostly ASCII).
pub fn decompress_from_base64(encoded: &str, limit: usize) -> Result<String, LzStringError> {
    // Form decoding turns `+` into spaces; `=` padding carries no bits.
    let values = encoded
        .trim()
        .bytes()
        .filter(|byte| *byte != b'=')
        .map(|byte| {
            let byte = if byte == b' ' { b'+' } else { byte };
            BASE64_ALPHABET
                .iter()
                .position(|known| *known == byte)
                .and_then(|value| u32::try_from(value).ok())
                .ok_or(LzStringError::Alphabet(char::from(byte)))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let units = decompress(&values, 6, limit / 2)?;
    String::from_utf16(&units).map_err(|_| LzStringError::Utf16)
}

/// Reads `values` of `bits_per_value` bits, most significant bit first within each value, and
/// least significant first within each number read (LZString's bit order).
struct Bits<'a> {
    values: &'a [u32],
    reset: u32,
    index: usize,
    current: u32,
    position: u32,
}

impl Bits<'_> {
    fn read(&mut self, count: u32) -> Result<u32, LzStringError> {
        let mut number = 0;
        for bit in 0..count {
            if self.position == 0 {
                self.current = *self
                    .values
                    .get(self.index)
                    .ok_or(LzStringError::Truncated)?;
                self.index += 1;
                self.position = self.reset;
            }
            if self.current & self.position != 0 {
                number |= 1 << bit;
            }
            self.position >>= 1;
        }
        Ok(number)
    }
}

/// The core of LZString's `_decompress`, on UTF-16 code units, stopping past `max_units`.
fn decompress(
    values: &[u32],
    bits_per_value: u32,
    max_units: usize,
) -> Result<Vec<u16>, LzStringError> {
    let too_large = LzStringError::TooLarge {
        limit: max_units * 2,
    };
    let mut bits = Bits {
        values,
        reset: 1 << (bits_per_value - 1),
        index: 0,
        current: 0,
        position: 0,
    };
    // Codes 0, 1 and 2 are instructions (a new 8-bit or 16-bit character, the end); entries
    // start at 3.
    let mut dictionary: Vec<Vec<u16>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut enlarge_in: u32 = 4;
    let mut num_bits: u32 = 3;

    let first = match bits.read(2)? {
        0 => char_unit(bits.read(8)?),
        1 => char_unit(bits.read(16)?),
        _ => return Ok(Vec::new()),
    };
    dictionary.push(vec![first]);
    let mut previous = vec![first];
    let mut output = vec![first];
    loop {
        let mut code = bits.read(num_bits)?;
        match code {
            0 | 1 => {
                let width = if code == 0 { 8 } else { 16 };
                let unit = char_unit(bits.read(width)?);
                dictionary.push(vec![unit]);
                code = u32::try_from(dictionary.len() - 1).map_err(|_| too_large.clone())?;
                enlarge_in -= 1;
            }
            2 => return Ok(output),
            _ => {}
        }
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
        let code = usize::try_from(code).map_err(|_| LzStringError::BadReference)?;
        let entry = match dictionary.get(code) {
            Some(entry) => entry.clone(),
            // The one code not yet in the dictionary: the previous entry and its first unit.
            None if code == dictionary.len() => {
                let mut entry = previous.clone();
                entry.push(previous[0]);
                entry
            }
            None => return Err(LzStringError::BadReference),
        };
        if output.len() + entry.len() > max_units {
            return Err(too_large);
        }
        output.extend_from_slice(&entry);
        let mut added = previous;
        added.push(entry[0]);
        dictionary.push(added);
        enlarge_in -= 1;
        previous = entry;
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
    }
}

/// A code read as a character: 8 or 16 bits, so always a UTF-16 code unit.
fn char_unit(code: u32) -> u16 {
    u16::try_from(code).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_lzstring_compresses_comes_back() {
        let texts = [
            "a".to_owned(),
            "hello world, hello world, hello world".to_owned(),
            r#"[{"event":"$pageview","properties":{"distinct_id":"ü-42","$current_url":"https://example.com/€"}}]"#.to_owned(),
            "abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(50),
            "😀 surrogate pairs 😀".to_owned(),
        ];
        for text in texts {
            let encoded = lz_str::compress_to_base64(text.as_str());
            assert_eq!(
                decompress_from_base64(&encoded, 1 << 20).as_deref(),
                Ok(text.as_str())
            );
        }
    }

    #[test]
    fn form_decoding_spaces_are_plus_signs() {
        let text = r#"{"event":"a","properties":{"k":"????>>>>"}}"#.repeat(20);
        let encoded = lz_str::compress_to_base64(text.as_str());
        let from_form = encoded.replace('+', " ");
        assert_eq!(decompress_from_base64(&from_form, 1 << 20), Ok(text));
    }

    #[test]
    fn the_limit_stops_a_bomb_while_it_expands() {
        let text = "a".repeat(100_000);
        let encoded = lz_str::compress_to_base64(text.as_str());
        assert!(encoded.len() < 2_000, "{} bytes", encoded.len());
        assert_eq!(
            decompress_from_base64(&encoded, 10_000),
            Err(LzStringError::TooLarge { limit: 10_000 })
        );
    }

    #[test]
    fn broken_input_is_an_error_not_a_panic() {
        let encoded = lz_str::compress_to_base64("hello hello hello");
        assert_eq!(
            decompress_from_base64(&encoded[..encoded.len() / 2], 1 << 20),
            Err(LzStringError::Truncated)
        );
        assert_eq!(
            decompress_from_base64("ab*cd", 1 << 20),
            Err(LzStringError::Alphabet('*'))
        );
        for garbage in ["////////", "AAAA", "zzzzzzzzzzzz"] {
            let _ = decompress_from_base64(garbage, 1 << 20);
        }
    }
}
