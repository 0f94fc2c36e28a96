//! Line charts as inline SVG, drawn on the server: no script and no CDN (cluster machines are often
//! offline). Every point is also an element with its step and value as `data-` attributes and a
//! tooltip, so the chart can be read back exactly (the browser test does).

use std::fmt::Write;

use super::escape;

/// One named line.
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// (step, value) in step order.
    pub points: Vec<(u64, f64)>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The chart of `series` under `title`; `id` names it for the page (`data-chart`).
pub fn line_chart(id: &str, title: &str, series: &[Series]) -> String {
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(_, v)| v.is_finite())
    };
    let mut svg = format!(
        "<figure class=\"chart\"><figcaption>{}</figcaption>",
        escape(title)
    );
    let Some((min_step, max_step, min_v, max_v)) = bounds(finite()) else {
        svg.push_str("<p class=\"empty\">no steps reported yet</p></figure>");
        return svg;
    };
    let (lo, hi) = if max_v > min_v {
        (min_v, max_v)
    } else {
        (min_v - 0.5, max_v + 0.5)
    };
    let span = (max_step - min_step).max(1) as f64;
    let x = |step: u64| LEFT + (step - min_step) as f64 / span * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (HEIGHT - TOP - BOTTOM);
    let _ = write!(
        svg,
        "<svg data-chart=\"{}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\"><rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" class=\"frame\"/>",
        escape(id),
        WIDTH - LEFT - RIGHT,
        HEIGHT - TOP - BOTTOM
    );
    axis_labels(&mut svg, (min_step, max_step), (lo, hi));
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = s
            .points
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(step, v)| format!("{:.1},{:.1}", x(*step), y(*v)))
            .collect();
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>",
            line.join(" ")
        );
        for (step, v) in s.points.iter().filter(|(_, v)| v.is_finite()) {
            let _ = write!(
                svg,
                "<circle class=\"point\" data-series=\"{name}\" data-step=\"{step}\" data-value=\"{v}\" \
                 cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"><title>{name} step {step}: {v}</title></circle>",
                x(*step),
                y(*v),
                name = escape(s.name),
            );
        }
    }
    svg.push_str("</svg><div class=\"legend\">");
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            svg,
            "<span><i style=\"background:{}\"></i>{}</span>",
            COLOURS[i % COLOURS.len()],
            escape(s.name)
        );
    }
    svg.push_str("</div></figure>");
    svg
}

fn bounds<'a>(points: impl Iterator<Item = &'a (u64, f64)>) -> Option<(u64, u64, f64, f64)> {
    points.fold(None, |acc, &(step, v)| {
        Some(match acc {
            None => (step, step, v, v),
            Some((s0, s1, v0, v1)) => (s0.min(step), s1.max(step), v0.min(v), v1.max(v)),
        })
    })
}

fn axis_labels(svg: &mut String, (s0, s1): (u64, u64), (lo, hi): (f64, f64)) {
    let bottom = HEIGHT - BOTTOM;
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"end\">{}</text>\
         <text x=\"{LEFT}\" y=\"{}\" class=\"tick\">step {s0}</text>\
         <text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"end\">step {s1}</text>",
        LEFT - 4.0,
        TOP + 10.0,
        short(hi),
        LEFT - 4.0,
        bottom,
        short(lo),
        bottom + 16.0,
        WIDTH - RIGHT,
        bottom + 16.0,
    );
}

/// A tick label: 4 significant digits, exponent form for very small or large values.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite point is an element carrying its exact step and value; NaN is left out; a chart
    /// without points says so.
    #[test]
    fn points_carry_their_step_and_value() {
        let svg = line_chart(
            "loss",
            "losses",
            &[
                Series {
                    name: "itc",
                    points: vec![(1, 2.5), (2, f64::NAN), (3, 1.25)],
                },
                Series {
                    name: "<itm>",
                    points: vec![(1, 0.75)],
                },
            ],
        );
        assert_eq!(svg.matches("class=\"point\"").count(), 3);
        assert!(svg.contains("data-series=\"itc\" data-step=\"3\" data-value=\"1.25\""));
        assert!(svg.contains("&lt;itm&gt;") && !svg.contains("<itm>"));
        assert!(line_chart("lr", "lr", &[]).contains("no steps reported yet"));
    }
}
