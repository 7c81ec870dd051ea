"""An example third-party plugin: registers the ``ExampleForCausalLM`` architecture.

The engine finds this module through the ``framework.plugins`` entry point in
this package's pyproject.toml; nothing in the core names it. The model class
is registered lazily (a "module:Class" string), so ``framework plugins``
lists it without importing torch code.
"""

from framework import hookimpl


@hookimpl
def register_models(register):
    register("ExampleForCausalLM", "framework_example_plugin.model:ExampleForCausalLM")
