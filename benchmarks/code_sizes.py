"""Largest modules and functions of components/ and flows/ at git revisions: `python3 benchmarks/code_sizes.py REV [REV ...]`."""
import ast, subprocess, sys

def files(rev):
    out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(".py") and f.startswith(("components/", "flows/"))]

def text(rev, path):
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout

def main(rev):
    mods, funcs = [], []
    for path in files(rev):
        src = text(rev, path)
        mods.append((src.count("\n"), path))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
    mods.sort(reverse=True); funcs.sort(reverse=True)
    print(f"## {rev}\nmodules: " + ", ".join(f"{p} {n}" for n, p in mods[:8]))
    print("functions: " + ", ".join(f"{p} {n}" for n, p in funcs[:10]))
    print(f"functions over 60 lines: {sum(n > 60 for n, _ in funcs)}")

for rev in sys.argv[1:]:
    main(rev)
