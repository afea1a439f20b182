//! Rebuilds the server when a migration is added or changed: `sqlx::migrate!`
//! embeds the migrations at compile time, and a stable compiler does not
//! track the files it read.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
