//! Finds things that look like plaintext card numbers in raw column bytes:
//! runs of 13 to 19 ASCII digits (single spaces or dashes allowed between
//! digits) that pass the Luhn check and stand on their own, i.e. are not
//! glued to letters (a digit run inside a hex string or an id is not a PAN).

/// True when `bytes` contains a Luhn-valid 13–19 digit run.
pub fn contains_pan(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = Vec::with_capacity(19);
        let mut end = i;
        while end < bytes.len() {
            let b = bytes[end];
            if b.is_ascii_digit() {
                digits.push(b - b'0');
                end += 1;
            } else if (b == b' ' || b == b'-')
                && end + 1 < bytes.len()
                && bytes[end + 1].is_ascii_digit()
                && end > start
            {
                end += 1;
            } else {
                break;
            }
        }
        let glued = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_');
        let standalone =
            !glued(start.checked_sub(1).and_then(|p| bytes.get(p))) && !glued(bytes.get(end));
        if standalone && (13..=19).contains(&digits.len()) && luhn(&digits) {
            return true;
        }
        i = end.max(i + 1);
    }
    false
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::contains_pan;

    #[test]
    fn finds_pans_in_text() {
        assert!(contains_pan(b"{\"note\":\"4111111111111111\"}"));
        assert!(contains_pan(b"card 4111 1111 1111 1111."));
        assert!(contains_pan(b"378282246310005"));
        assert!(contains_pan(b"x=4111-1111-1111-1111"));
    }

    #[test]
    fn ignores_non_pans() {
        assert!(!contains_pan(b"4111111111111112")); // Luhn fails
        assert!(!contains_pan(b"1700000000")); // a timestamp
        assert!(!contains_pan(b"41111111")); // a BIN
        assert!(!contains_pan(b"ab4111111111111111cd")); // inside a token
        assert!(!contains_pan(b"41111111111111110000")); // 20 digits
        assert!(!contains_pan(b""));
    }
}
