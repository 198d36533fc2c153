"""The solver benchmark (the solvers_bench package) on the device machine's CPU cores."""
