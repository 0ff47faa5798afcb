/*
 * Protocol v1 frames (bindings/PROTOCOL.md): building request maps and reading reply maps with
 * msgpack-c. Pure functions over buffers; no sockets, no client state. Thread-safe.
 */
#ifndef NPCTALK_WIRE_H
#define NPCTALK_WIRE_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#include "npctalk/npctalk.h"

#define WIRE_MAX_REPLY_BYTES (1 << 20) /* what a client accepts from the server (ZMQ_MAXMSGSIZE) */
#define WIRE_MAX_ID_CHARS 64

typedef enum wire_type { WIRE_OK, WIRE_TOKEN, WIRE_DONE, WIRE_ERROR } wire_type;

/* A borrowed view of a msgpack str: not NUL-terminated, lives as long as its reply. */
typedef struct wire_str {
    const char *ptr;
    size_t len;
} wire_str;

/* One reply frame, checked for its type's required fields (engine/protocol.py parse_reply). */
typedef struct wire_reply {
    msgpack_unpacked unpacked; /* owns every borrowed pointer below; the map is unpacked.data */
    wire_type type;
    int has_id;                /* 0: the id was nil (the server could not read the request) */
    wire_str id;
    int has_seq;
    int64_t seq;               /* token, done; error ending a say */
    wire_str text;             /* token, done */
    wire_str finish_reason;    /* done */
    wire_str code, message;    /* error */
} wire_reply;

/* --- requests -------------------------------------------------------------------------------- */

/* Start a request map {v, id, op, ...}: `fields` more key/value pairs must follow. */
void wire_begin(msgpack_packer *pk, const char *id, const char *op, size_t fields);
void wire_key(msgpack_packer *pk, const char *key);
void wire_pack_str(msgpack_packer *pk, const char *value);
void wire_pack_strings(msgpack_packer *pk, const npctalk_strings *strings);

/* A whole ping or cancel frame ({v, id, op} or {v, id, op, target}). */
void wire_simple(msgpack_sbuffer *out, const char *id, const char *op, const char *target);

/* --- replies --------------------------------------------------------------------------------- */

/* Parse `len` bytes; on failure writes a sentence to `err` and returns NPCTALK_E_PROTOCOL. A
 * successful parse must be released with wire_reply_free (a failed one needs nothing). */
npctalk_status wire_parse_reply(const char *data, size_t len, wire_reply *out, char *err, size_t err_cap);
void wire_reply_free(wire_reply *reply);

/* The value of `key` in a map object, or NULL. */
const msgpack_object *wire_get(const msgpack_object *map, const char *key);
int wire_str_eq(wire_str s, const char *c_string);
/* Copy a str field of `map` into `dst` (NUL-terminated, truncated to fit); "" when absent. */
void wire_copy_str(const msgpack_object *map, const char *key, char *dst, size_t cap);
/* A number field of `map` as double / int; `fallback` when absent or not a number. */
double wire_number(const msgpack_object *map, const char *key, double fallback);
int64_t wire_int(const msgpack_object *map, const char *key, int64_t fallback);

#endif /* NPCTALK_WIRE_H */
