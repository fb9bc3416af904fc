"""How the code reads, in numbers: per top-level .py file (test_all.py aside), its lines, code lines, functions,
`raise` and `try` statements, and the share of its code lines that refuse or survive (a `raise`, an `except`, or the
`if` of a guard: an if whose body raises). Code lines are the lines of statements, without blank lines, comments and
docstrings.

    python tools/measure.py                   # the table of this checkout, and the totals
    python tools/measure.py --root OTHER      # of another checkout (e.g. a git worktree of an earlier commit)
"""
import ast
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docstring_lines(tree):
    """The line numbers of every docstring (module, class, function)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                      str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source, tree):
    """Lines holding a token of a statement (not a comment, a blank or a docstring)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstring_lines(tree)


def refusing_lines(tree):
    """Lines of raise statements, except clauses and guard ifs (an if whose own body raises)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            lines.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.ExceptHandler):
            lines.add(node.lineno)
        elif isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body):
            lines.update(range(node.test.lineno, node.test.end_lineno + 1))
    return lines


def measure(path):
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source)
    code = code_lines(source, tree)
    count = lambda kind: sum(isinstance(n, kind) for n in ast.walk(tree))
    return dict(lines=len(source.splitlines()), code=len(code), functions=count((ast.FunctionDef, ast.AsyncFunctionDef)),
                raises=count(ast.Raise), tries=count(ast.Try), refusing=len(refusing_lines(tree) & code))


def main(argv):
    root = argv[argv.index("--root") + 1] if "--root" in argv else ROOT
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and f != "test_all.py")
    rows = {name: measure(os.path.join(root, name)) for name in names}
    print(f"{'file':<18}{'lines':>7}{'code':>7}{'functions':>10}{'raise':>7}{'try':>5}{'refuse or survive':>19}")
    for name, r in rows.items():
        print(f"{name:<18}{r['lines']:>7}{r['code']:>7}{r['functions']:>10}{r['raises']:>7}{r['tries']:>5}"
              f"{r['refusing']:>9} {100 * r['refusing'] / max(r['code'], 1):>7.1f}%")
    total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    print(f"{f'{len(rows)} files':<18}{total['lines']:>7}{total['code']:>7}{total['functions']:>10}{total['raises']:>7}"
          f"{total['tries']:>5}{total['refusing']:>9} {100 * total['refusing'] / total['code']:>7.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
