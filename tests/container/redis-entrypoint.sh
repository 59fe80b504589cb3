#!/bin/sh
# As the official image: any interface, no protected mode (it sits on a private network).
if [ "$1" = redis-server ]; then
  shift
  exec redis-server --bind '* -::*' --protected-mode no "$@"
fi
exec "$@"
