"""Every documented config field is read somewhere in tagscale/, as a field of its own class: a field nothing reads
is a setting that silently does nothing. `cfg.train.seed` is a read of TrainConfig.seed, not of BaseConfig.seed, so
a read counts only where the class of the object it is read from is known. Static (source text only), about a second.

The class of an expression is inferred the way a reader would: a parameter or variable annotated with a config class,
a variable assigned from an expression of known class, a loop variable over a list field (`for task in cfg.tasks`),
a call of a package function whose return annotation is a config class, and a field of a known class
(`cfg.train` is a TrainConfig when `cfg` is a RunConfig). The resolved config as plain data (run.json's "config")
counts when it is indexed by a chain of field names from the top (`config["train"]["seed"]`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from conftest import ROOT

PACKAGE = ROOT / "tagscale"
ROOT_CLASS = "RunConfig"
# Fields that are read nowhere on purpose, each with its reason (keep this small; empty is best).
ALLOWED_UNREAD: dict[str, str] = {}


@dataclass
class Schema:
    """Config classes: each field's class (None for plain values), and whether it holds a list of that class;
    `others`: the package's other classes' attributes of a config class (`Session.cfg: RunConfig`)."""
    fields: dict[str, dict[str, tuple[str | None, bool]]] = field(default_factory=dict)
    others: dict[str, dict[str, tuple[str | None, bool]]] = field(default_factory=dict)

    def field_class(self, cls: str | None, name: str) -> tuple[str | None, bool]:
        if not cls:
            return None, False
        return self.fields.get(cls, self.others.get(cls, {})).get(name, (None, False))

    @property
    def known(self) -> set[str]:
        return set(self.fields) | set(self.others)


def annotation_class(node: ast.expr | None, classes: set[str]) -> tuple[str | None, bool]:
    """(config class, is a list of it) named by an annotation: `TaskConfig`, `Optional[HeadConfig]`,
    `list[TagConfig]`, `"RunConfig"`, `config.RunConfig`, `TaskConfig | None`."""
    if node is None:
        return None, False
    text = ast.unparse(node).replace('"', "").replace("'", "")
    names = [n for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if n in classes]
    if len(names) != 1:
        return None, False
    return names[0], bool(re.search(r"\b(list|List|Sequence|Iterable|tuple)\[", text))


def schema_of(tree: ast.Module) -> Schema:
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and any(
        getattr(d, "id", getattr(getattr(d, "func", None), "id", None)) == "dataclass" for d in node.decorator_list)]
    names = {c.name for c in classes}
    return Schema({c.name: {item.target.id: annotation_class(item.annotation, names) for item in c.body
                            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
                   for c in classes})


def add_package_classes(schema: Schema, trees: dict[str, ast.Module]) -> None:
    """The attributes of the package's other classes that hold config: annotated class-body fields, and
    `self.x = param` in a method where the parameter is annotated with a config class."""
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or node.name in schema.fields:
                continue
            attrs = {item.target.id: annotation_class(item.annotation, set(schema.fields)) for item in node.body
                     if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
            for method in (m for m in node.body if isinstance(m, ast.FunctionDef)):
                params = {a.arg: annotation_class(a.annotation, set(schema.fields)) for a in method.args.args}
                for st in (s for s in ast.walk(method) if isinstance(s, ast.Assign)):
                    pairs = [(t, st.value) for t in st.targets]  # `self.a, self.b = a, b` too
                    pairs += [p for t in st.targets if isinstance(t, ast.Tuple) and isinstance(st.value, ast.Tuple)
                              for p in zip(t.elts, st.value.elts)]
                    for target, value in pairs:
                        if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                and target.value.id == "self" and isinstance(value, ast.Name) and value.id in params):
                            attrs[target.attr] = params[value.id]
            attrs = {k: v for k, v in attrs.items() if v[0]}
            if attrs:
                schema.others[node.name] = attrs


class Reads(ast.NodeVisitor):
    """Walks one module, inferring config classes of names and expressions, and records (class, field) reads."""

    def __init__(self, schema: Schema, returns: dict[str, tuple[str | None, bool]], skip: set[str] = frozenset()):
        self.schema, self.returns, self.skip = schema, returns, skip
        self.scopes: list[dict[str, tuple[str | None, bool]]] = [{}]
        self.found: set[tuple[str, str]] = set()
        self.classes: list[str] = []  # the class whose body is being walked: a method's `self`

    # -- inference
    def lookup(self, name: str) -> tuple[str | None, bool]:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None, False

    def class_of(self, node: ast.expr) -> tuple[str | None, bool]:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == "self" or not isinstance(node.ctx, ast.Load):
                return None, False
            owner, is_list = self.class_of(node.value)
            return self.schema.field_class(owner, node.attr) if owner and not is_list else (None, False)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name == "next" and node.args and isinstance(node.args[0], ast.GeneratorExp):
                owner, is_list = self.class_of(node.args[0])
                return (owner, False) if is_list else (None, False)
            return self.returns.get(name, (None, False))
        if isinstance(node, ast.Subscript):
            owner, is_list = self.class_of(node.value)
            return (owner, False) if is_list else (None, False)
        if isinstance(node, (ast.GeneratorExp, ast.ListComp)):  # `(t for t in cfg.tags if ...)`: a list of TagConfig
            self.scopes.append({})
            self.bind_generators(node)
            owner = self.class_of(node.elt)
            self.scopes.pop()
            return (owner[0], True) if owner[0] and not owner[1] else (None, False)
        if isinstance(node, ast.IfExp):
            return self.class_of(node.body) if self.class_of(node.body)[0] else self.class_of(node.orelse)
        if isinstance(node, ast.BoolOp):
            return next((c for c in map(self.class_of, node.values) if c[0]), (None, False))
        return None, False

    def bind(self, target: ast.expr, kind: tuple[str | None, bool]) -> None:
        if isinstance(target, ast.Name):
            self.scopes[-1][target.id] = kind

    def bind_iteration(self, target: ast.expr, iterable: ast.expr) -> None:
        """`for x in cfg.tasks`, `for i, x in enumerate(cfg.tasks)`, `for a, x in zip(..., cfg.tasks)`."""
        if isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name) and isinstance(target, ast.Tuple):
            if iterable.func.id == "enumerate" and len(target.elts) == 2 and iterable.args:
                return self.bind_iteration(target.elts[1], iterable.args[0])
            if iterable.func.id == "zip" and len(target.elts) == len(iterable.args):
                for t, it in zip(target.elts, iterable.args):
                    self.bind_iteration(t, it)
                return None
        owner, is_list = self.class_of(iterable)
        if owner and is_list:
            self.bind(target, (owner, False))

    def bind_generators(self, node: ast.GeneratorExp | ast.ListComp | ast.SetComp | ast.DictComp) -> bool:
        for gen in node.generators:
            self.bind_iteration(gen.target, gen.iter)
        return True

    # -- scopes
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in self.skip:
            return
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.scopes.append({})
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                self.scopes[-1][arg.arg] = annotation_class(arg.annotation, self.schema.known)
        if self.classes and args.args and args.args[0].arg == "self":
            self.scopes[-1]["self"] = (self.classes[-1], False)
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.scopes.append({a.arg: (None, False) for a in node.args.args})
        self.visit(node.body)
        self.scopes.pop()

    def visit_comprehension_node(self, node) -> None:
        self.scopes.append({})
        for gen in node.generators:
            self.visit(gen.iter)
            self.bind_iteration(gen.target, gen.iter)
            for condition in gen.ifs:
                self.visit(condition)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                self.visit(getattr(node, part))
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = visit_comprehension_node

    # -- bindings
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        kind = self.class_of(node.value)
        for target in node.targets:
            self.visit(target)
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                for t, v in zip(target.elts, node.value.elts):
                    self.bind(t, self.class_of(v))
            else:
                self.bind(target, kind)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)
        kind = annotation_class(node.annotation, self.schema.known)
        self.bind(node.target, kind if kind[0] else self.class_of(node.value) if node.value else (None, False))

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.bind(node.target, self.class_of(node.value))

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self.bind_iteration(node.target, node.iter)
        self.visit(node.target)
        for statement in [*node.body, *node.orelse]:
            self.visit(statement)

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.bind(item.optional_vars, self.class_of(item.context_expr))
        for statement in node.body:
            self.visit(statement)

    # -- reads
    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.visit(node.value)
        owner, is_list = self.class_of(node.value)
        if (isinstance(node.ctx, ast.Load) and owner in self.schema.fields and not is_list
                and node.attr in self.schema.fields[owner]):
            self.found.add((owner, node.attr))

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        # getattr(obj, "field") on an object of known class
        if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
            owner, is_list = self.class_of(node.args[0])
            key = node.args[1]
            if (owner in self.schema.fields and not is_list and isinstance(key, ast.Constant)
                    and key.value in self.schema.fields[owner]):
                self.found.add((owner, key.value))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self.generic_visit(node)
        chain = subscript_chain(node)
        if chain and len(chain) >= 2:
            self.found |= resolve_chain(self.schema, chain)


def subscript_chain(node: ast.expr) -> list[str]:
    """The string keys of `x["a"]["b"]...` (also `.get("a")`), outermost last; [] when any key is not a string."""
    keys: list[str] = []
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            keys.append(node.slice.value)
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            keys.append(node.args[0].value)
            node = node.func.value
        else:
            return keys[::-1]


def resolve_chain(schema: Schema, chain: list[str]) -> set[tuple[str, str]]:
    """(class, field) reads of a chain of keys into the resolved config dict, walked from the top class; a chain
    that starts with "config" (run.json's key for it) is walked from the key after it."""
    if chain[0] == "config":
        chain = chain[1:]
    found, owner = set(), ROOT_CLASS
    for key in chain:
        if owner is None or key not in schema.fields[owner]:
            return found if found and len(chain) > 1 else set()
        found.add((owner, key))
        owner, is_list = schema.field_class(owner, key)
        if is_list:
            return found
    return found


def package_returns(trees: dict[str, ast.Module], classes: set[str]) -> dict[str, tuple[str | None, bool]]:
    """Package functions (by bare name) whose return annotation names one config class."""
    returns = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = annotation_class(node.returns, classes)
                if kind[0]:
                    returns[node.name] = kind
    return returns


def reads_in(sources: dict[str, str], schema: Schema) -> set[tuple[str, str]]:
    """(class, field) reads in these module sources. In config.py the dataclasses' own methods count, but not
    `validate`, its `_check_*` checks and the builders (a check of a field is not a use of it)."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    add_package_classes(schema, trees)
    returns = package_returns(trees, set(schema.fields))
    found: set[tuple[str, str]] = set()
    for name, tree in trees.items():
        checks = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("_check_")}
        visitor = Reads(schema, returns, {"validate", "build", "load_config"} | checks if name == "config.py" else set())
        visitor.visit(tree)
        found |= visitor.found
    return found


def config_schema() -> Schema:
    return schema_of(ast.parse((PACKAGE / "config.py").read_text()))


def test_the_matcher_attributes_a_read_to_the_class_it_is_read_from():
    schema = config_schema()
    assert {"RunConfig", "BaseConfig", "TrainConfig", "TaskConfig", "DataConfig"} <= set(schema.fields)
    code = '''
from tagscale.config import RunConfig, TaskConfig
def f(cfg: RunConfig, other):
    x = cfg.train.seed                 # TrainConfig.seed, not BaseConfig.seed
    other.base.dtype                   # unknown object: no read
    for task in cfg.tasks:
        task.train.limit               # DataConfig.limit
    t = next(t for t in cfg.tags if t.name)
    t.head.penalty                     # HeadConfig.penalty (via TagConfig.head)
    cfg.evaluation.limit = 3           # an assignment is not a read
def g(run: dict):
    return run["config"]["evaluation"]["micro_batch"]
'''
    found = reads_in({"example.py": code}, schema)
    assert ("TrainConfig", "seed") in found and ("BaseConfig", "seed") not in found
    assert ("BaseConfig", "dtype") not in found
    assert ("DataConfig", "limit") in found and ("EvalConfig", "limit") not in found
    assert ("TagConfig", "name") in found and ("HeadConfig", "penalty") in found
    assert ("EvalConfig", "micro_batch") in found and ("TrainConfig", "micro_batch") not in found


def test_every_config_field_is_read_in_the_package():
    schema = config_schema()
    fields = [(cls, name) for cls, names in schema.fields.items() for name in names]
    assert len(fields) > 40 and ("TrainConfig", "grad_clip") in fields  # the parse found the config's fields
    sources = {p.name if p.parent == PACKAGE else str(p.relative_to(PACKAGE)): p.read_text()
               for p in sorted(PACKAGE.rglob("*.py"))}
    found = reads_in(sources, schema)
    unread = [f"{cls}.{name}" for cls, name in fields
              if (cls, name) not in found and f"{cls}.{name}" not in ALLOWED_UNREAD]
    assert not unread, f"config fields that nothing in tagscale/ reads as a field of their own class: {', '.join(unread)}"
    stale = [name for name in ALLOWED_UNREAD if tuple(name.split(".")) not in fields]
    assert not stale, f"allow-list entries that are not config fields any more: {stale}"
