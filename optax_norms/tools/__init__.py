"""The commands behind ``python -m optax_norms demo|bench``.

Apart from the library: the core (``optax_norms``) never imports this subpackage, and it
may import the ``[demo]``/``[test]`` extras lazily.
"""
