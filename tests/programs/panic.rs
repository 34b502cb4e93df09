#[inline(never)]
fn explode(depth: u32) -> u32 {
    if depth == 0 {
        panic!("boom"); // MARK:explode
    }
    explode(depth - 1) + 1
}

fn main() {
    let n = std::env::args().count() as u32;
    println!("{}", explode(n)); // MARK:main
}
