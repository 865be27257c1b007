//! The efficiency goals, printed at the end of a run as one table: each
//! measured in this run, next to its goal, met or not. Ratios are what the
//! goals are about; absolute numbers are this machine's.

/// Which way a goal points.
#[derive(Clone, Copy)]
pub enum Want {
    AtLeast(f64),
    AtMost(f64),
}

struct Row {
    measure: &'static str,
    value: f64,
    unit: &'static str,
    want: Want,
}

#[derive(Default)]
pub struct Goals(Vec<Row>);

impl Goals {
    pub fn record(&mut self, measure: &'static str, value: f64, unit: &'static str, want: Want) {
        self.0.push(Row {
            measure,
            value,
            unit,
            want,
        });
    }

    pub fn print(&self) {
        if self.0.is_empty() {
            return;
        }
        println!("\ngoals (this run)");
        println!("{:<64} {:>12} {:>10}  met", "measure", "measured", "goal");
        for row in &self.0 {
            let (goal, met) = match row.want {
                Want::AtLeast(goal) => (format!("≥ {goal}"), row.value >= goal),
                Want::AtMost(goal) => (format!("≤ {goal}"), row.value <= goal),
            };
            println!(
                "{:<64} {:>8.2} {:<3} {:>10}  {}",
                row.measure,
                row.value,
                row.unit,
                goal,
                if met { "yes" } else { "NO" }
            );
        }
    }
}
