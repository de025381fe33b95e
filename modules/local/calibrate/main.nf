/*
 * CALIBRATE: one tissue threshold pooled over every slide of the run (--tissue_calibration),
 * so PLAN finds tissue the same way on all slides of a cohort instead of per-slide Otsu.
 * Each slide comes with its pixel size (the samplesheet's, else --pixel_size_um; null: the
 * slide's metadata), in the same order as the slides.
 */
process CALIBRATE {
    tag "${slides.size()} slides"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    tuple val(pixel_sizes), path(slides, arity: '1..*', stageAs: 'slides??/*')

    output:
    path 'tissue_calibration.json', emit: calibration
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    def own_sizes = [slides, pixel_sizes].transpose()
        .findAll { slide, size -> size != null }
        .collect { slide, size -> "--slide-pixel-size-um ${slide}=${size}" }
        .join(' ')
    """
    bmseg --no-progress calibrate-tissue ${slides} ${own_sizes} ${args} --out tissue_calibration.json

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    echo '{}' > tissue_calibration.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
