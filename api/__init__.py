"""The HTTP layer: DRF views and serializers, routes, pagination and the error handler. It sits
on top of every app (docs/ARCHITECTURE.md) and holds no business logic: views validate the
shape of input and call the services in tasks and agents."""
