"""HTTP only: routes, schemas, errors. Everything else is the engine's."""
