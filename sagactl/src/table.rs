//! Plain-text tables and timestamps for people.

use saga_core::Timestamp;

/// Rows of columns, printed left-aligned with two spaces between columns.
pub(crate) struct Table<const N: usize> {
    header: [String; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    /// A table with these column titles.
    pub(crate) fn new(header: [&str; N]) -> Self {
        Table { header: header.map(str::to_owned), rows: Vec::new() }
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, row: [String; N]) {
        self.rows.push(row);
    }

    /// Prints the titles and the rows.
    pub(crate) fn print(&self) {
        print!("{}", self.render(true));
    }

    /// Prints the rows only.
    pub(crate) fn print_plain(&self) {
        print!("{}", self.render(false));
    }

    fn render(&self, titles: bool) -> String {
        let mut widths = [0; N];
        let shown = titles.then_some(&self.header).into_iter().chain(&self.rows);
        for row in shown.clone() {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in shown {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i + 1 == N {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A timestamp as `2026-11-30 12:04:05.123` (UTC); `-` for 0 (unknown).
pub(crate) fn at(t: Timestamp) -> String {
    if t.0 == 0 {
        return "-".into();
    }
    let secs = t.0 / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        t.0 % 1000
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_in_utc() {
        assert_eq!(at(Timestamp(0)), "-");
        assert_eq!(at(Timestamp(1)), "1970-01-01 00:00:00.001");
        // 2026-11-30 12:04:05.123 UTC
        assert_eq!(at(Timestamp(1_796_040_245_123)), "2026-11-30 12:04:05.123");
        // A leap day.
        assert_eq!(at(Timestamp(951_782_400_000)), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn columns_align_and_lines_have_no_trailing_spaces() {
        let mut t = Table::new(["A", "LONGER", "C"]);
        t.row(["xyz".into(), "1".into(), String::new()]);
        assert_eq!(t.render(true), "A    LONGER  C\nxyz  1\n");
        assert_eq!(t.render(false), "xyz  1\n");
    }
}
