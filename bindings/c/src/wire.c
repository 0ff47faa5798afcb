/* Protocol v1 frames with msgpack-c: see wire.h. */
#include "wire.h"

#include <stdio.h>
#include <string.h>

/* --- requests -------------------------------------------------------------------------------- */

void wire_pack_str(msgpack_packer *pk, const char *value) {
    msgpack_pack_str_with_body(pk, value, strlen(value));
}

void wire_key(msgpack_packer *pk, const char *key) { wire_pack_str(pk, key); }

void wire_begin(msgpack_packer *pk, const char *id, const char *op, size_t fields) {
    msgpack_pack_map(pk, 3 + fields);
    wire_key(pk, "v");
    msgpack_pack_int(pk, NPCTALK_PROTOCOL_VERSION);
    wire_key(pk, "id");
    wire_pack_str(pk, id);
    wire_key(pk, "op");
    wire_pack_str(pk, op);
}

void wire_pack_strings(msgpack_packer *pk, const npctalk_strings *strings) {
    msgpack_pack_array(pk, strings->count);
    for (size_t i = 0; i < strings->count; i++) wire_pack_str(pk, strings->items[i]);
}

void wire_simple(msgpack_sbuffer *out, const char *id, const char *op, const char *target) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
    wire_begin(&pk, id, op, target ? 1 : 0);
    if (target) {
        wire_key(&pk, "target");
        wire_pack_str(&pk, target);
    }
}

/* --- replies --------------------------------------------------------------------------------- */

static wire_str as_str(const msgpack_object *o) {
    wire_str s = {o->via.str.ptr, o->via.str.size};
    return s;
}

int wire_str_eq(wire_str s, const char *c_string) {
    size_t n = strlen(c_string);
    return s.len == n && memcmp(s.ptr, c_string, n) == 0;
}

const msgpack_object *wire_get(const msgpack_object *map, const char *key) {
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP) return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == n &&
            memcmp(kv->key.via.str.ptr, key, n) == 0)
            return &kv->val;
    }
    return NULL;
}

static int is_int(const msgpack_object *o) {
    return o && (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER || o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER);
}

void wire_copy_str(const msgpack_object *map, const char *key, char *dst, size_t cap) {
    const msgpack_object *o = wire_get(map, key);
    size_t n = 0;
    if (o && o->type == MSGPACK_OBJECT_STR) {
        n = o->via.str.size < cap - 1 ? o->via.str.size : cap - 1;
        memcpy(dst, o->via.str.ptr, n);
    }
    dst[n] = '\0';
}

double wire_number(const msgpack_object *map, const char *key, double fallback) {
    const msgpack_object *o = wire_get(map, key);
    if (o == NULL) return fallback;
    switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return (double)o->via.u64;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return (double)o->via.i64;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return o->via.f64;
    default: return fallback;
    }
}

int64_t wire_int(const msgpack_object *map, const char *key, int64_t fallback) {
    const msgpack_object *o = wire_get(map, key);
    if (!is_int(o)) return fallback;
    return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (int64_t)(o->via.u64 & INT64_MAX) : o->via.i64;
}

/* Keys and text must be msgpack str (never bin) all the way down; ext types are not allowed. */
static const char *shape_problem(const msgpack_object *o, int depth) {
    if (depth > 8) return "nests maps/arrays more than 8 levels deep"; /* PROTOCOL.md: MAX_DEPTH */
    if (o->type == MSGPACK_OBJECT_BIN) return "holds bin data where the protocol only allows str";
    if (o->type == MSGPACK_OBJECT_EXT) return "holds an ext type, which the protocol does not allow";
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            const char *p = shape_problem(&o->via.array.ptr[i], depth + 1);
            if (p) return p;
        }
    } else if (o->type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            if (o->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR) return "has a map key that is not a str";
            const char *p = shape_problem(&o->via.map.ptr[i].val, depth + 1);
            if (p) return p;
        }
    }
    return NULL;
}

/* A required field of the reply's type, checked like engine/protocol.py _REPLY_FIELDS. */
static int need(const msgpack_object *map, const char *key, msgpack_object_type type, const char *kind,
                char *err, size_t cap) {
    const msgpack_object *o = wire_get(map, key);
    int fine = o != NULL && (o->type == type || (type == MSGPACK_OBJECT_POSITIVE_INTEGER && is_int(o)));
    if (!fine) snprintf(err, cap, "The server sent a %s reply without a valid '%s' field.", kind, key);
    return fine;
}

npctalk_status wire_parse_reply(const char *data, size_t len, wire_reply *out, char *err, size_t cap) {
    memset(out, 0, sizeof *out);
    if (len > WIRE_MAX_REPLY_BYTES) {
        snprintf(err, cap, "The server sent a %zu-byte frame; the limit is %d.", len, WIRE_MAX_REPLY_BYTES);
        return NPCTALK_E_PROTOCOL;
    }
    msgpack_unpacked_init(&out->unpacked);
    size_t offset = 0;
    msgpack_unpack_return ret = msgpack_unpack_next(&out->unpacked, data, len, &offset);
    const msgpack_object *map = &out->unpacked.data;
    const char *problem = NULL;
    if (ret != MSGPACK_UNPACK_SUCCESS) problem = "is not valid msgpack";
    else if (offset != len) problem = "holds bytes after its msgpack map";
    else if (map->type != MSGPACK_OBJECT_MAP) problem = "is not a msgpack map";
    else problem = shape_problem(map, 1);
    if (problem) {
        snprintf(err, cap, "The server sent a frame that %s.", problem);
        msgpack_unpacked_destroy(&out->unpacked);
        return NPCTALK_E_PROTOCOL;
    }
    const msgpack_object *type = wire_get(map, "type");
    const msgpack_object *id = wire_get(map, "id");
    static const char *const names[] = {"ok", "token", "done", "error"};
    int kind = -1;
    for (int i = 0; type && type->type == MSGPACK_OBJECT_STR && i < 4; i++)
        if (wire_str_eq(as_str(type), names[i])) kind = i;
    int fine = 1;
    if (kind < 0) {
        snprintf(err, cap, "The server sent a reply whose 'type' is not one of ok, token, done, error.");
        fine = 0;
    } else if (id && id->type != MSGPACK_OBJECT_STR && id->type != MSGPACK_OBJECT_NIL) {
        snprintf(err, cap, "The server sent a reply whose 'id' is neither a string nor nil.");
        fine = 0;
    } else if (kind == WIRE_TOKEN) {
        fine = need(map, "seq", MSGPACK_OBJECT_POSITIVE_INTEGER, "token", err, cap) &&
               need(map, "text", MSGPACK_OBJECT_STR, "token", err, cap);
    } else if (kind == WIRE_DONE) {
        fine = need(map, "seq", MSGPACK_OBJECT_POSITIVE_INTEGER, "done", err, cap) &&
               need(map, "text", MSGPACK_OBJECT_STR, "done", err, cap) &&
               need(map, "finish_reason", MSGPACK_OBJECT_STR, "done", err, cap) &&
               need(map, "usage", MSGPACK_OBJECT_MAP, "done", err, cap) &&
               need(map, "timings", MSGPACK_OBJECT_MAP, "done", err, cap);
    } else if (kind == WIRE_ERROR) {
        fine = need(map, "code", MSGPACK_OBJECT_STR, "error", err, cap) &&
               need(map, "message", MSGPACK_OBJECT_STR, "error", err, cap);
    }
    if (fine && kind == WIRE_DONE) {
        wire_str reason = as_str(wire_get(map, "finish_reason"));
        if (!wire_str_eq(reason, "stop") && !wire_str_eq(reason, "length") && !wire_str_eq(reason, "cancelled")) {
            snprintf(err, cap, "The server sent an unknown finish_reason '%.*s'.", (int)(reason.len > 40 ? 40 : reason.len),
                     reason.ptr);
            fine = 0;
        }
    }
    if (!fine) {
        msgpack_unpacked_destroy(&out->unpacked);
        return NPCTALK_E_PROTOCOL;
    }
    out->type = (wire_type)kind;
    out->has_id = id != NULL && id->type == MSGPACK_OBJECT_STR;
    if (out->has_id) out->id = as_str(id);
    const msgpack_object *seq = wire_get(map, "seq");
    out->has_seq = is_int(seq);
    out->seq = wire_int(map, "seq", -1);
    const msgpack_object *o;
    if ((o = wire_get(map, "text")) && o->type == MSGPACK_OBJECT_STR) out->text = as_str(o);
    if ((o = wire_get(map, "finish_reason")) && o->type == MSGPACK_OBJECT_STR) out->finish_reason = as_str(o);
    if ((o = wire_get(map, "code")) && o->type == MSGPACK_OBJECT_STR) out->code = as_str(o);
    if ((o = wire_get(map, "message")) && o->type == MSGPACK_OBJECT_STR) out->message = as_str(o);
    return NPCTALK_OK;
}

void wire_reply_free(wire_reply *reply) { msgpack_unpacked_destroy(&reply->unpacked); }
