//! Figures printed with a fixed number of decimals, as JSON numbers (the
//! reports of the examples keep the precision they always had).

use serde::Serializer;

/// Serialize `x` as the number that `{:.N}` prints: an integer for
/// `N == 0`; `null` when `x` is not finite. For `#[serde(serialize_with =
/// "json::fixed::<N, _>")]`.
pub(crate) fn fixed<const N: usize, S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    let text = format!("{x:.N$}");
    if N == 0
        && let Ok(n) = text.parse::<i64>()
    {
        return s.serialize_i64(n);
    }
    s.serialize_f64(text.parse().unwrap_or(*x))
}
