"""`python -m solvers_bench [--quick|--full] [--out DIR] [--workers N] ...`"""

import typer

from solvers_bench.cli import solvers_cmd


def main() -> None:
    typer.run(solvers_cmd)


if __name__ == "__main__":
    main()
