//! Aligned tables for human output, like `kubectl get` and `cilium endpoint
//! list`: a cell may hold several lines (labels), which continue on the
//! following rows.

/// Renders `rows` under `headers`, columns separated by three spaces.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.lines().map(|l| l.chars().count()).max().unwrap_or(0);
            if let Some(slot) = widths.get_mut(i) {
                *slot = (*slot).max(w);
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers);
    for row in rows {
        let split: Vec<Vec<&str>> = row.iter().map(|c| c.lines().collect()).collect();
        let height = split.iter().map(Vec::len).max().unwrap_or(1).max(1);
        for n in 0..height {
            let cells: Vec<&str> = split.iter().map(|c| c.get(n).copied().unwrap_or("")).collect();
            line(&cells);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_and_multi_line_cells_continue() {
        let rows = vec![
            vec!["12".into(), "ns=default\napp=web".into(), "ready".into()],
            vec!["7".into(), "ns=x".into(), "failed: no interface".into()],
        ];
        assert_eq!(
            super::render(&["ENDPOINT", "LABELS", "STATUS"], &rows),
            "ENDPOINT   LABELS       STATUS\n\
             12         ns=default   ready\n\
             \x20          app=web\n\
             7          ns=x         failed: no interface\n"
        );
    }
}
