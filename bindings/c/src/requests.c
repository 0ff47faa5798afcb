#define _POSIX_C_SOURCE 200809L /* strdup */
/*
 * The ops (PROTOCOL.md "Requests"): blocking hello / ping / npc.upsert, streaming say, cancel.
 * Arguments are checked here only as far as encoding needs (NULLs, empty ids); limits and ranges
 * are the server's to check, so its bad_request / too_large sentences reach the caller unchanged.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

npctalk_say_options npctalk_say_defaults(void) {
    npctalk_say_options o = {NULL, NULL, 0, 0, -1.0, -1.0, -1, -1, 0, 0};
    return o;
}

#define MAX_REQUEST_BYTES (64 * 1024) /* PROTOCOL.md limits: the server cannot even read the id of a larger frame */

/* A frame the server would refuse unread is refused here, where the caller can be told which. */
static npctalk_status check_size(npctalk_client *c, const char *op, const msgpack_sbuffer *frame) {
    if (frame->size <= MAX_REQUEST_BYTES) return NPCTALK_OK;
    return fail(c, NPCTALK_E_TOO_LARGE, "The %s request is %zu bytes; the server accepts at most %d per frame.", op,
                frame->size, MAX_REQUEST_BYTES);
}

/* --- blocking calls ------------------------------------------------------------------------- */

/* Send k->frame and pump until its answer, an error, or `retries` reconnects. On NPCTALK_OK the
 * caller parses k->reply and frees it. */
static npctalk_status call_run(npctalk_client *c, call *k) {
    if (c->dispatching > 0) {
        msgpack_sbuffer_destroy(&k->frame);
        return fail(c, NPCTALK_E_INVALID_ARGUMENT,
                    "%s was called from a callback; blocking calls must run outside callbacks.", k->op);
    }
    if (check_size(c, k->op, &k->frame) != NPCTALK_OK) {
        msgpack_sbuffer_destroy(&k->frame);
        return NPCTALK_E_TOO_LARGE;
    }
    wake(c);
    c->call = k;
    k->attempts = 1;
    npctalk_status sent = send_frame(c, &k->frame);
    if (sent != NPCTALK_OK) {
        k->finished = 1;
        k->status = sent;
        snprintf(k->error, sizeof k->error, "%s", c->error);
    }
    while (!k->finished && !c->closing) {
        npctalk_status pumped = pump(c, c->options.timeout_ms);
        if (pumped != NPCTALK_OK && pumped != NPCTALK_E_TIMEOUT) {
            k->finished = 1;
            k->status = pumped;
            snprintf(k->error, sizeof k->error, "%s", c->error);
        }
    }
    c->call = NULL;
    msgpack_sbuffer_destroy(&k->frame);
    if (!k->finished) { /* npctalk_close ran in a callback meanwhile */
        finish_deferred_close(c);
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    if (k->status != NPCTALK_OK) {
        free(k->reply);
        k->reply = NULL;
        return fail(c, k->status, "%s", k->error);
    }
    c->error[0] = '\0';
    return NPCTALK_OK;
}

/* A call with the frame builder's packer ready: {v, id, op} plus `fields` pairs the caller packs. */
static void call_init(npctalk_client *c, call *k, const char *op, size_t fields, msgpack_packer *pk) {
    memset(k, 0, sizeof *k);
    k->op = op;
    next_id(c, k->id, NULL);
    msgpack_sbuffer_init(&k->frame);
    msgpack_packer_init(pk, &k->frame, msgpack_sbuffer_write);
    wire_begin(pk, k->id, op, fields);
}

npctalk_status npctalk_ping(npctalk_client *c) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    call k;
    msgpack_packer pk;
    call_init(c, &k, "ping", 0, &pk);
    npctalk_status status = call_run(c, &k);
    free(k.reply);
    return status;
}

npctalk_status npctalk_hello(npctalk_client *c, npctalk_server_info *info) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    call k;
    msgpack_packer pk;
    call_init(c, &k, "hello", 0, &pk);
    npctalk_status status = call_run(c, &k);
    if (status != NPCTALK_OK) return status;
    wire_reply r;
    char err[256];
    status = wire_parse_reply(k.reply, k.reply_len, &r, err, sizeof err); /* r's views point into k.reply */
    if (status != NPCTALK_OK) {
        free(k.reply);
        return fail(c, status, "%s", err);
    }
    if (info) {
        const msgpack_object *map = &r.unpacked.data;
        const msgpack_object *model = wire_get(map, "model"), *caps = wire_get(map, "capabilities");
        memset(info, 0, sizeof *info);
        wire_copy_str(map, "server", info->server, sizeof info->server);
        wire_copy_str(map, "version", info->version, sizeof info->version);
        info->protocol = (int)wire_int(map, "protocol", 0);
        wire_copy_str(model, "name", info->model, sizeof info->model);
        wire_copy_str(model, "dialogue_format", info->dialogue_format, sizeof info->dialogue_format);
        info->max_context = (int)wire_int(model, "max_context", 0);
        info->max_new_tokens = (int)wire_int(caps, "max_new_tokens", 0);
        info->client_timeout_ms = (int)wire_int(caps, "client_timeout_ms", 0);
    }
    wire_reply_free(&r);
    free(k.reply);
    return NPCTALK_OK;
}

static int strings_ok(const npctalk_strings *s) {
    if (s->count > 0 && s->items == NULL) return 0;
    for (size_t i = 0; i < s->count; i++)
        if (s->items[i] == NULL) return 0;
    return 1;
}

/* Start an npc.upsert frame: its npc field and the persona key; the caller packs the persona value. */
static void begin_upsert(npctalk_client *c, call *k, const char *npc, msgpack_packer *pk) {
    call_init(c, k, "npc.upsert", 2, pk);
    wire_key(pk, "npc");
    wire_pack_str(pk, npc);
    wire_key(pk, "persona");
}

/* Send a built npc.upsert frame and read `created` from its answer. */
static npctalk_status run_upsert(npctalk_client *c, call *k, int *created) {
    npctalk_status status = call_run(c, k);
    if (status != NPCTALK_OK) return status;
    wire_reply r;
    char err[256];
    status = wire_parse_reply(k->reply, k->reply_len, &r, err, sizeof err); /* r's views point into k->reply */
    if (status != NPCTALK_OK) {
        free(k->reply);
        return fail(c, status, "%s", err);
    }
    const msgpack_object *was_created = wire_get(&r.unpacked.data, "created");
    if (created) *created = was_created && was_created->type == MSGPACK_OBJECT_BOOLEAN && was_created->via.boolean;
    wire_reply_free(&r);
    free(k->reply);
    return NPCTALK_OK;
}

npctalk_status npctalk_upsert_npc(npctalk_client *c, const char *npc, const npctalk_persona *p, int *created) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    if (npc == NULL || npc[0] == '\0')
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_upsert_npc needs an NPC id (e.g. \"guard_03\").");
    if (p == NULL || p->name == NULL || p->role == NULL)
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "The persona of NPC '%s' needs a name and a role.", npc);
    enum { TEXTS = 9, LISTS = 5 };
    const char *text_keys[TEXTS] = {"name", "role", "description", "speaking_style", "greeting", "scenario",
                                    "system_override", "post_history", "example_dialogue"};
    const char *texts[TEXTS] = {p->name, p->role, p->description, p->speaking_style, p->greeting, p->scenario,
                                p->system_override, p->post_history, p->example_dialogue};
    const char *list_keys[LISTS] = {"traits", "background", "goals", "unknowns", "example_lines"};
    const npctalk_strings *lists[LISTS] = {&p->traits, &p->background, &p->goals, &p->unknowns, &p->example_lines};
    size_t entries = 0;
    for (int i = 0; i < TEXTS; i++) entries += texts[i] != NULL;
    for (int i = 0; i < LISTS; i++) {
        if (!strings_ok(lists[i]))
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "Persona field '%s' of NPC '%s' has a NULL item.", list_keys[i], npc);
        entries += lists[i]->count > 0;
    }
    call k;
    msgpack_packer pk;
    begin_upsert(c, &k, npc, &pk);
    msgpack_pack_map(&pk, entries);
    for (int i = 0; i < TEXTS; i++) {
        if (texts[i] == NULL) continue;
        wire_key(&pk, text_keys[i]);
        wire_pack_str(&pk, texts[i]);
    }
    for (int i = 0; i < LISTS; i++) {
        if (lists[i]->count == 0) continue;
        wire_key(&pk, list_keys[i]);
        wire_pack_strings(&pk, lists[i]);
    }
    return run_upsert(c, &k, created);
}

npctalk_status npctalk_upsert_npc_msgpack(npctalk_client *c, const char *npc, const void *persona, size_t len,
                                          int *created) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    if (npc == NULL || npc[0] == '\0')
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_upsert_npc_msgpack needs an NPC id (e.g. \"guard_03\").");
    /* One whole map and nothing after it, or the frame would be unreadable as a whole. */
    msgpack_unpacked check;
    msgpack_unpacked_init(&check);
    size_t offset = 0;
    int one_map = persona != NULL && msgpack_unpack_next(&check, persona, len, &offset) == MSGPACK_UNPACK_SUCCESS &&
                  offset == len && check.data.type == MSGPACK_OBJECT_MAP;
    msgpack_unpacked_destroy(&check);
    if (!one_map)
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "The persona of NPC '%s' must be exactly one msgpack map "
                                                   "(%zu bytes given).", npc, persona ? len : 0);
    call k;
    msgpack_packer pk;
    begin_upsert(c, &k, npc, &pk);
    msgpack_sbuffer_write(&k.frame, persona, len); /* already msgpack: appended as the value */
    return run_upsert(c, &k, created);
}

/* Bytes of the map header at the start of a packed map (fixmap, map 16, map 32); 0 if not a map. */
static size_t map_header_len(const unsigned char *data, size_t len) {
    if (len >= 1 && (data[0] & 0xf0) == 0x80) return 1;
    if (len >= 3 && data[0] == 0xde) return 3;
    if (len >= 5 && data[0] == 0xdf) return 5;
    return 0;
}

npctalk_status npctalk_call(npctalk_client *c, const char *op, const void *fields, size_t fields_len, void **answer,
                            size_t *answer_len) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    if (answer) *answer = NULL;
    if (answer_len) *answer_len = 0;
    if (op == NULL || op[0] == '\0') return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_call needs an op name.");
    if (strcmp(op, "say") == 0)
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "say streams its answer: use npctalk_say, not npctalk_call.");
    size_t entries = 0, header = 0;
    if (fields != NULL || fields_len > 0) {
        /* One whole map whose keys are not the envelope's: its entries join the request map. */
        msgpack_unpacked check;
        msgpack_unpacked_init(&check);
        size_t offset = 0;
        int fine = fields != NULL && msgpack_unpack_next(&check, fields, fields_len, &offset) == MSGPACK_UNPACK_SUCCESS &&
                   offset == fields_len && check.data.type == MSGPACK_OBJECT_MAP;
        static const char *const envelope[] = {"v", "id", "op"};
        const char *clash = NULL;
        for (uint32_t i = 0; fine && i < check.data.via.map.size; i++) {
            const msgpack_object *key = &check.data.via.map.ptr[i].key;
            fine = key->type == MSGPACK_OBJECT_STR;
            wire_str name = {key->via.str.ptr, key->via.str.size};
            for (int j = 0; fine && j < 3; j++)
                if (wire_str_eq(name, envelope[j])) clash = envelope[j];
        }
        if (fine) entries = check.data.via.map.size;
        msgpack_unpacked_destroy(&check);
        header = map_header_len(fields, fields_len);
        if (!fine || header == 0)
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "The fields of %s must be one msgpack map with string keys.", op);
        if (clash)
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "The fields of %s hold '%s', which npctalk_call sets itself.", op,
                        clash);
    }
    call k;
    msgpack_packer pk;
    call_init(c, &k, op, entries, &pk);
    if (entries > 0) msgpack_sbuffer_write(&k.frame, (const char *)fields + header, fields_len - header);
    npctalk_status status = call_run(c, &k);
    if (status != NPCTALK_OK) return status;
    if (answer) *answer = k.reply; /* the ok frame, already checked to be one map */
    else free(k.reply);
    if (answer_len) *answer_len = k.reply_len;
    return NPCTALK_OK;
}

void npctalk_free(void *memory) { free(memory); }

/* --- say ------------------------------------------------------------------------------------ */

static npctalk_status check_context(npctalk_client *c, const npctalk_say_options *o) {
    if (o->context_count > 0 && o->context == NULL)
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "context_count is %zu but context is NULL.", o->context_count);
    for (size_t i = 0; i < o->context_count; i++) {
        const npctalk_context_entry *e = &o->context[i];
        if (e->key == NULL || e->key[0] == '\0')
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "Context entry %zu has no key.", i);
        if ((e->kind == NPCTALK_VALUE_STRING && e->string == NULL) ||
            (e->kind == NPCTALK_VALUE_STRINGS && !strings_ok(&e->strings)))
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "Context entry '%s' has a NULL string.", e->key);
        if (e->kind < NPCTALK_VALUE_STRING || e->kind > NPCTALK_VALUE_STRINGS)
            return fail(c, NPCTALK_E_INVALID_ARGUMENT, "Context entry '%s' has an unknown kind %d.", e->key, (int)e->kind);
    }
    return NPCTALK_OK;
}

static void pack_context(msgpack_packer *pk, const npctalk_say_options *o) {
    msgpack_pack_map(pk, o->context_count);
    for (size_t i = 0; i < o->context_count; i++) {
        const npctalk_context_entry *e = &o->context[i];
        wire_key(pk, e->key);
        switch (e->kind) {
        case NPCTALK_VALUE_STRING: wire_pack_str(pk, e->string); break;
        case NPCTALK_VALUE_INT: msgpack_pack_int64(pk, e->integer); break;
        case NPCTALK_VALUE_NUMBER: msgpack_pack_double(pk, e->number); break;
        case NPCTALK_VALUE_BOOL: e->boolean ? msgpack_pack_true(pk) : msgpack_pack_false(pk); break;
        case NPCTALK_VALUE_STRINGS: wire_pack_strings(pk, &e->strings); break;
        }
    }
}

/* The say frame: only the fields the options set (the rest are the server's defaults). */
static void pack_say(msgpack_packer *pk, const char *id, const char *npc, const char *text,
                     const npctalk_say_options *o) {
    int has[] = {o->player != NULL, o->context_count > 0, o->max_new_tokens > 0, o->temperature >= 0,
                 o->top_p > 0, o->top_k >= 0, o->seed >= 0, o->deadline_ms > 0};
    size_t fields = 2;
    for (size_t i = 0; i < sizeof has / sizeof has[0]; i++) fields += (size_t)has[i];
    wire_begin(pk, id, "say", fields);
    wire_key(pk, "npc");
    wire_pack_str(pk, npc);
    wire_key(pk, "text");
    wire_pack_str(pk, text);
    if (has[0]) { wire_key(pk, "player"); wire_pack_str(pk, o->player); }
    if (has[1]) { wire_key(pk, "context"); pack_context(pk, o); }
    if (has[2]) { wire_key(pk, "max_new_tokens"); msgpack_pack_int(pk, o->max_new_tokens); }
    if (has[3]) { wire_key(pk, "temperature"); msgpack_pack_double(pk, o->temperature); }
    if (has[4]) { wire_key(pk, "top_p"); msgpack_pack_double(pk, o->top_p); }
    if (has[5]) { wire_key(pk, "top_k"); msgpack_pack_int(pk, o->top_k); }
    if (has[6]) { wire_key(pk, "seed"); msgpack_pack_int64(pk, o->seed); }
    if (has[7]) { wire_key(pk, "deadline_ms"); msgpack_pack_int(pk, o->deadline_ms); }
}

npctalk_status npctalk_say(npctalk_client *c, const char *npc, const char *text, const npctalk_say_options *options,
                           const npctalk_callbacks *callbacks, npctalk_reply_id *reply) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    if (reply) *reply = 0;
    npctalk_say_options o = options ? *options : npctalk_say_defaults();
    if (npc == NULL || npc[0] == '\0') return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_say needs an NPC id.");
    if (text == NULL || text[0] == '\0')
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_say needs the player's text (it was empty).");
    npctalk_status status = check_context(c, &o);
    if (status != NPCTALK_OK) return status;
    stream *s = calloc(1, sizeof *s);
    if (s) s->npc = strdup(npc);
    if (s) s->text = calloc(1, 1);
    if (s == NULL || s->npc == NULL || s->text == NULL) {
        if (s) free(s->npc);
        free(s);
        return fail(c, NPCTALK_E_NO_MEMORY, "Out of memory while starting a reply.");
    }
    s->text_cap = 1;
    if (callbacks) s->callbacks = *callbacks;
    next_id(c, s->id, &s->reply);
    msgpack_sbuffer frame;
    msgpack_sbuffer_init(&frame);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &frame, msgpack_sbuffer_write);
    pack_say(&pk, s->id, npc, text, &o);
    status = check_size(c, "say", &frame);
    if (status == NPCTALK_OK) {
        wake(c);
        status = send_frame(c, &frame);
    }
    msgpack_sbuffer_destroy(&frame);
    if (status != NPCTALK_OK) {
        free_stream(s);
        return status;
    }
    if (o.timeout_ms > 0) s->expires_ms = now_ms() + o.timeout_ms;
    s->next = c->streams;
    c->streams = s;
    c->running++;
    if (reply) *reply = s->reply;
    return NPCTALK_OK;
}

npctalk_status npctalk_cancel(npctalk_client *c, npctalk_reply_id reply) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    for (stream *s = c->streams; s; s = s->next) {
        if (s->reply == reply) {
            send_cancel(c, s);
            return NPCTALK_OK;
        }
    }
    return fail(c, NPCTALK_E_INVALID_ARGUMENT, "No running reply %llu: it has ended or never existed.",
                (unsigned long long)reply);
}
