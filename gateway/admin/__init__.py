"""The admin plane behind ``/admin``: routes, request bodies, the service, promotion."""
