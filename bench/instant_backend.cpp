// The bench's instant backend: answers llama-server's routes at once, with llama-server's own
// HTTP stack (cpp-httplib from the pinned llama.cpp source, its thread pool sized the same way),
// so that a proxy in front of it pays what it pays in front of llama-server, per request and per
// connection, and the proxy's cost is what the token-path requests/s case measures.
//
// Built once by bench/env.py, with the compile definitions llama.cpp's CMakeLists gives
// cpp-httplib:  instant-backend PORT CHAT_JSON MODELS_JSON

#include "httplib.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

static bool read_file(const char *path, std::string &out) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        return false;
    }
    std::ostringstream text;
    text << in.rdbuf();
    out = text.str();
    return true;
}

static int parse_port(const char *text) {
    char *end = nullptr;
    const long port = std::strtol(text, &end, 10);
    return (end != text && *end == '\0' && port >= 1 && port <= 65535) ? static_cast<int>(port) : 0;
}

int main(int argc, char **argv) {
    std::string chat;
    std::string models;
    const int port = argc == 4 ? parse_port(argv[1]) : 0;
    if (port == 0 || !read_file(argv[2], chat) || !read_file(argv[3], models)) {
        std::fprintf(stderr, "usage: %s PORT CHAT_JSON MODELS_JSON\n", argv[0]);
        return 2;
    }

    httplib::Server server;
    // llama-server's defaults (common.h, server-http.cpp): hour-long timeouts, SO_REUSEADDR.
    server.set_read_timeout(3600);
    server.set_write_timeout(3600);
    server.set_socket_options([](auto sock) {
        httplib::set_socket_opt(sock, SOL_SOCKET, SO_REUSEADDR, 1);
    });
    // llama-server with --parallel 1: max(n_parallel + 4, cores - 1) fixed threads, plus up to
    // 1024 that come and go, so that every kept-alive connection gets a thread of its own.
    const unsigned cores = std::thread::hardware_concurrency();
    const size_t fixed = std::max<size_t>(5, cores > 1 ? cores - 1 : 1);
    server.new_task_queue = [fixed] { return new httplib::ThreadPool(fixed, fixed + 1024); };

    const auto json = "application/json; charset=utf-8";
    server.Get("/health", [json](const httplib::Request &, httplib::Response &res) {
        res.set_content("{\"status\":\"ok\"}", json);
    });
    server.Get("/v1/models", [&models, json](const httplib::Request &, httplib::Response &res) {
        res.set_content(models, json);
    });
    server.Post("/v1/chat/completions", [&chat, json](const httplib::Request &, httplib::Response &res) {
        res.set_content(chat, json);
    });
    if (!server.listen("127.0.0.1", port)) {
        std::fprintf(stderr, "cannot listen on 127.0.0.1:%d\n", port);
        return 1;
    }
    return 0;
}
