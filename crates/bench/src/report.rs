//! What a scenario leaves behind: CSV tables and PNG line plots in the output directory.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::Context;
use plotters::prelude::*;

/// A table of results, written as `NAME.csv`.
#[derive(Debug, Clone)]
pub struct Table {
    name: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(name: &str, header: &[&str]) -> Table {
        Table {
            name: name.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; numbers are written as they print.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: ToString,
    {
        let row: Vec<String> = cells.into_iter().map(|c| c.to_string()).collect();
        debug_assert_eq!(row.len(), self.header.len(), "row width of {}", self.name);
        self.rows.push(row);
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Vec<String>] {
        &self.rows
    }

    /// Writes `DIR/NAME.csv` and returns its path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{}.csv", self.name));
        let mut w = csv::Writer::from_path(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(&self.header)?;
        for r in &self.rows {
            w.write_record(r)?;
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The table as aligned text, for the terminal.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(String::len).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut out = line(&self.header);
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out
    }
}

/// One line of a plot: a label and its points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from its label and points.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.into(),
            points,
        }
    }
}

/// A line plot, written as `NAME.png`.
#[derive(Debug, Clone)]
pub struct Plot {
    /// File name without extension.
    pub name: String,
    /// Caption.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis (payload sizes, counts spanning decades).
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

impl Plot {
    /// A plot with linear axes and no lines yet.
    pub fn new(name: &str, title: &str, x_label: &str, y_label: &str) -> Plot {
        Plot {
            name: name.to_string(),
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            log_x: false,
            log_y: false,
            series: Vec::new(),
        }
    }

    /// Writes `DIR/NAME.png` (1024×640) and returns its path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        register_font();
        let path = dir.join(format!("{}.png", self.name));
        self.draw(&path)
            .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
        Ok(path)
    }

    fn draw(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        // Linear y axes start at zero so ratios between lines read true.
        if !self.log_y {
            y0 = y0.min(0.0);
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let y1 = if self.log_y { y1 * 1.5 } else { y1 * 1.1 };
        let (x0, y0) = (
            if self.log_x { x0.max(1e-9) } else { x0 },
            if self.log_y { y0.max(1e-9) } else { y0 },
        );

        let root = BitMapBackend::new(path, (1024, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut b = ChartBuilder::on(&root);
        b.caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80);
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 14))
                    .draw()?;
                for (i, s) in self.series.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().copied(),
                            color.stroke_width(2),
                        ))?
                        .label(s.label.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                if self.series.len() > 1 {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .label_font(("sans-serif", 14))
                        .draw()?;
                }
            }};
        }
        match (self.log_x, self.log_y) {
            (false, false) => finish!(b.build_cartesian_2d(x0..x1, y0..y1)?),
            (true, false) => finish!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?),
            (false, true) => finish!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?),
            (true, true) => {
                finish!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?)
            }
        }
        root.present()?;
        Ok(())
    }
}

/// Plot text uses DejaVu Sans built into the binary, so plotting needs no fonts installed.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        if plotters::style::register_font("sans-serif", FontStyle::Normal, font).is_err() {
            tracing::warn!("the built-in plot font did not load; plots will have no text");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_writes_csv_and_plot_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Table::new("t", &["clients", "msgs_per_s"]);
        t.row([1.0, 1000.0]);
        t.row([2.0, 1900.5]);
        let csv = std::fs::read_to_string(t.write(dir.path()).unwrap()).unwrap();
        assert_eq!(csv, "clients,msgs_per_s\n1,1000\n2,1900.5\n");
        assert!(t.render().contains("1900.5"));

        for (log_x, log_y) in [(false, false), (true, true)] {
            let mut p = Plot::new("p", "title", "x", "y");
            p.log_x = log_x;
            p.log_y = log_y;
            p.series
                .push(Series::new("a", vec![(1.0, 10.0), (10.0, 100.0)]));
            p.series
                .push(Series::new("b", vec![(1.0, 5.0), (10.0, 50.0)]));
            let png = std::fs::read(p.write(dir.path()).unwrap()).unwrap();
            assert_eq!(&png[1..4], b"PNG");
        }
    }
}
