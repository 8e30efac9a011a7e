"""Config loading: defaults < YAML recipe < CLI overrides, strict keys, resolved config dump.

`loader` is the generic machinery (imported by every component's config), `schema` the root config,
`load` the entry points; this package imports none of them so components can import `loader` freely.
"""
