/* Replies from the server: matching a frame to its call or stream, checking seq and done.text,
 * dispatching the callbacks. See client.h. */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

void free_stream(stream *s) {
    free(s->npc);
    free(s->text);
    free(s);
}

static void unlink_stream(npctalk_client *c, stream *s) {
    for (stream **p = &c->streams; *p; p = &(*p)->next) {
        if (*p == s) {
            *p = s->next;
            c->running--;
            return;
        }
    }
}

void report_error(npctalk_client *c, stream *s, npctalk_status status, const char *message) {
    if (s->callbacks.on_error && !c->closing) {
        c->dispatching++;
        s->callbacks.on_error(s->callbacks.user, s->reply, status, message);
        c->dispatching--;
    }
    free_stream(s);
}

void fail_stream(npctalk_client *c, stream *s, npctalk_status status, int tell_server, const char *format, ...) {
    char message[512];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    if (tell_server) send_cancel(c, s);
    unlink_stream(c, s);
    report_error(c, s, status, message);
}

static int append_text(stream *s, wire_str text) {
    if (s->text_len + text.len + 1 > s->text_cap) {
        size_t cap = s->text_cap ? s->text_cap : 256;
        while (cap < s->text_len + text.len + 1) cap *= 2;
        char *grown = realloc(s->text, cap);
        if (grown == NULL) return 0;
        s->text = grown;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, text.ptr, text.len);
    s->text_len += text.len;
    s->text[s->text_len] = '\0';
    return 1;
}

static void finish_stream(npctalk_client *c, stream *s, const wire_reply *r) {
    const msgpack_object *map = &r->unpacked.data;
    if (r->text.len != s->text_len || memcmp(r->text.ptr, s->text, s->text_len) != 0) {
        fail_stream(c, s, NPCTALK_E_PROTOCOL, 0, "Reply %s: done.text differs from the streamed tokens.", s->id);
        return;
    }
    const msgpack_object *usage = wire_get(map, "usage"), *timings = wire_get(map, "timings");
    npctalk_result result = {
        .reply = s->reply, .npc = s->npc, .text = s->text, .text_len = s->text_len,
        .finish_reason = wire_str_eq(r->finish_reason, "stop") ? "stop"
                         : wire_str_eq(r->finish_reason, "length") ? "length" : "cancelled",
        .prompt_tokens = (int)wire_int(usage, "prompt_tokens", 0),
        .completion_tokens = (int)wire_int(usage, "completion_tokens", 0),
        .queue_ms = wire_number(timings, "queue_ms", 0.0),
        .ttft_ms = wire_number(timings, "ttft_ms", -1.0), /* nil: no token was generated */
        .total_ms = wire_number(timings, "total_ms", 0.0),
    };
    unlink_stream(c, s);
    if (s->callbacks.on_done && !c->closing) {
        c->dispatching++;
        s->callbacks.on_done(s->callbacks.user, &result);
        c->dispatching--;
    }
    free_stream(s);
}

static void on_stream_message(npctalk_client *c, stream *s, const wire_reply *r) {
    int64_t seq = r->has_seq ? r->seq : s->next_seq;
    if (seq != s->next_seq) {
        fail_stream(c, s, NPCTALK_E_PROTOCOL, 1, "Reply %s skipped from seq %lld to %lld.", s->id,
                    (long long)s->next_seq, (long long)seq);
        return;
    }
    s->next_seq++;
    switch (r->type) {
    case WIRE_TOKEN:
        if (!append_text(s, r->text)) {
            fail_stream(c, s, NPCTALK_E_NO_MEMORY, 1, "Out of memory while collecting reply %s.", s->id);
        } else if (s->callbacks.on_token && !c->closing) {
            c->dispatching++;
            s->callbacks.on_token(s->callbacks.user, s->reply, r->text.ptr, r->text.len, (uint32_t)seq);
            c->dispatching--;
        }
        break;
    case WIRE_DONE: finish_stream(c, s, r); break;
    case WIRE_ERROR:
        fail_stream(c, s, status_from_code_n(r->code.ptr, r->code.len), 0, "%.*s", (int)r->message.len,
                    r->message.ptr);
        break;
    case WIRE_OK: fail_stream(c, s, NPCTALK_E_PROTOCOL, 1, "Reply %s got an ok message.", s->id); break;
    }
}

static void on_call_reply(call *k, const wire_reply *r, const char *data, size_t len) {
    k->finished = 1;
    if (r->type == WIRE_OK) {
        k->reply = malloc(len ? len : 1);
        k->status = k->reply ? NPCTALK_OK : NPCTALK_E_NO_MEMORY;
        if (k->reply) memcpy(k->reply, data, len);
        k->reply_len = len;
        if (!k->reply) snprintf(k->error, sizeof k->error, "Out of memory while reading the %s answer.", k->op);
    } else if (r->type == WIRE_ERROR) {
        k->status = status_from_code_n(r->code.ptr, r->code.len);
        snprintf(k->error, sizeof k->error, "%.*s", (int)r->message.len, r->message.ptr);
    } else {
        k->status = NPCTALK_E_PROTOCOL;
        snprintf(k->error, sizeof k->error, "The server answered %s with a %s message.", k->op,
                 r->type == WIRE_TOKEN ? "token" : "done");
    }
}

void feed(npctalk_client *c, const char *data, size_t len) {
    c->last_heard_ms = now_ms();
    wire_reply r;
    char err[256];
    if (wire_parse_reply(data, len, &r, err, sizeof err) != NPCTALK_OK) {
        log_line(c, "Ignoring an unreadable frame from the server: %s", err);
        return;
    }
    stream *s = NULL;
    if (r.has_id) {
        for (s = c->streams; s && !wire_str_eq(r.id, s->id); s = s->next) {}
    }
    if (r.has_id && c->call && !c->call->finished && wire_str_eq(r.id, c->call->id)) {
        on_call_reply(c->call, &r, data, len);
    } else if (s) {
        on_stream_message(c, s, &r);
    } else if (!r.has_id && r.type == WIRE_ERROR) {
        log_line(c, "The server rejected a request it could not read: %.*s", (int)r.message.len, r.message.ptr);
    } /* else: the answer to a ping or cancel, or to a request given up on: a sign of life only */
    wire_reply_free(&r);
}
